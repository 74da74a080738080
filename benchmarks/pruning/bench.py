"""Vision-token pruning: the learned two-stage pruner against baselines, at matched token budgets.

    .venv/bin/python benchmarks/pruning/bench.py run        # data, base policy, learned stages, eval cells
    .venv/bin/python benchmarks/pruning/bench.py latency    # every cell timed back to back (run it idle)
    .venv/bin/python benchmarks/pruning/bench.py report     # results.md + success_vs_latency.png

Everything is resumable: each finished piece (dataset, training run, cell) is skipped on a rerun,
and training runs continue from their last checkpoint, so the benchmark spans sessions.

Set-up: the `tiny-256` preset (256 vision tokens) trained on TASKS (128 px, 50 expert demos per
task); held-out demonstrations (10 per task, another seed) for the action L1. A budget b is the
fraction of the 256 vision tokens left after the last selection. Per method and budget, a cell:
closed-loop success (EPISODES unseen positions per task), held-out L1, vision tokens per LLM
layer, FLOPs per chunk; `latency` then times predict_action_chunk (batch 1 and 8, 2 threads,
median of 20 after 5 warm-up calls; the median over 5 rounds in rotating order) for every
cell in one process, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from _lib import sh, write_json  # noqa: E402
from methods import ABLATIONS, METHODS, recipe  # noqa: E402

REPO = HERE.parents[1]
BIN = Path(os.environ.get("BIN", REPO / ".venv" / "bin"))
TASKS = "drawer-close-v3,button-press-topdown-v3,handle-press-v3"
# BENCH_* variables shrink everything for a smoke run of the harness (never for results); a smoke
# run gets its own folders, and every result records its set-up, so the two never mix.
DEMOS = int(os.environ.get("BENCH_DEMOS", 50))
BASE_STEPS = int(os.environ.get("BENCH_BASE_STEPS", 1500))
STAGE_STEPS = int(os.environ.get("BENCH_STAGE_STEPS", 300))
EPISODES = int(os.environ.get("BENCH_EPISODES", 20))
SAMPLES = int(os.environ.get("BENCH_SAMPLES", 512))
PRESET = os.environ.get("BENCH_PRESET", "tiny-256")
IMAGE = int(os.environ.get("BENCH_IMAGE", 128))
SETUP = {
    "preset": PRESET,
    "image": IMAGE,
    "demos": DEMOS,
    "base_steps": BASE_STEPS,
    "stage_steps": STAGE_STEPS,
    "episodes": EPISODES,
    "samples": SAMPLES,
}
SMOKE = any(
    k in os.environ
    for k in (
        "BENCH_DEMOS",
        "BENCH_BASE_STEPS",
        "BENCH_STAGE_STEPS",
        "BENCH_EPISODES",
        "BENCH_SAMPLES",
        "BENCH_PRESET",
        "BENCH_IMAGE",
    )
)
WORK = Path(os.environ.get("BENCH_WORK", REPO / "runs" / ("pruning-smoke" if SMOKE else "pruning")))
RESULTS = Path(os.environ.get("BENCH_RESULTS", WORK / "results" if SMOKE else HERE / "results"))
BUDGETS = (0.5, 0.25, 0.125)
DATA, HELD, BASE = WORK / "data", WORK / "heldout", WORK / "base"
# The trained base policy is committed (weights, config, statistics; about 55 minutes of CPU to
# redo): a session starts on a fresh machine, and everything else here is quick to rebuild.
PUBLISHED = HERE / "base_policy"
BASE_SETUP = {k: SETUP[k] for k in ("preset", "image", "demos", "base_steps")}


def cells() -> list[tuple[str, float]]:
    return [(m, b) for m in METHODS for b in BUDGETS] + [(m, 0.25) for m in ABLATIONS]


# ----- the pieces -----------------------------------------------------------------------------------
def prepare() -> None:
    """Training and held-out demonstrations at the preset's resolution, and the unpruned base policy."""
    log = WORK / "prepare.log"
    if not (DATA / "meta" / "info.json").is_file():
        sh(
            [
                BIN / "craftvla",
                "collect",
                "--out",
                DATA,
                "--tasks",
                TASKS,
                "--episodes",
                DEMOS,
                "--image_size",
                IMAGE,
                "--seed",
                "0",
            ],
            log,
        )
    if not (HELD / "meta" / "info.json").is_file():
        sh(
            [
                BIN / "craftvla",
                "collect",
                "--out",
                HELD,
                "--tasks",
                TASKS,
                "--episodes",
                max(2, DEMOS // 5),
                "--image_size",
                IMAGE,
                "--seed",
                "500",
            ],
            log,
        )
    if not SMOKE and published():
        return
    if not (BASE / "done").is_file():
        resume = ["--resume", "true"] if (BASE / "checkpoints" / "last").exists() else []
        sh(
            [
                BIN / "craftvla",
                "train",
                "--preset",
                PRESET,
                "--dataset.root",
                DATA,
                "--output_dir",
                BASE,
                "--steps",
                BASE_STEPS,
                "--batch_size",
                "32",
                "--optim.lr",
                "1e-3",
                "--dataset.num_workers",
                "1",
                "--checkpoint.save_freq",
                "200",
                "--log.log_freq",
                "10",
                "--seed",
                "0",
                *resume,
            ],
            log,
        )
        (BASE / "done").write_text("trained\n")
    if not SMOKE:
        publish(BASE / "checkpoints" / "last", BASE / "metrics.jsonl")


def base_policy() -> Path:
    """The unpruned policy: the committed one for a real run, the run's own for a smoke run."""
    return BASE / "checkpoints" / "last" if SMOKE else PUBLISHED


def published() -> bool:
    """Whether the committed base policy is there; refuses one trained with another set-up."""
    if not (PUBLISHED / "setup.json").is_file():
        return False
    setup = json.loads((PUBLISHED / "setup.json").read_text())
    if setup != BASE_SETUP:
        raise SystemExit(
            f"{PUBLISHED}: trained with set-up {setup}, this run's is {BASE_SETUP}; move it away to redo it"
        )
    return True


def publish(checkpoint: Path, metrics: Path) -> None:
    """Copy the trained policy (not its optimizer state) and its training log to PUBLISHED, atomically."""
    tmp = PUBLISHED.with_name(PUBLISHED.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint.resolve(), tmp, ignore=shutil.ignore_patterns("training_state"))
    shutil.copy(metrics, tmp / "train_metrics.jsonl")
    write_json(tmp / "setup.json", BASE_SETUP)
    os.replace(tmp, PUBLISHED)


def _stage(name: str, args: list, log: Path) -> Path:
    """A `prune train` run (resumed if interrupted); returns its last checkpoint."""
    out = WORK / name
    if not (out / "done").is_file():
        resume = ["--resume", "true"] if (out / "checkpoints" / "last").exists() else []
        sh(
            [
                BIN / "craftvla",
                "prune",
                "train",
                "--dataset.root",
                DATA,
                "--output_dir",
                out,
                "--steps",
                STAGE_STEPS,
                "--batch_size",
                "32",
                "--dataset.num_workers",
                "1",
                "--checkpoint.save_freq",
                "100",
                *args,
                *resume,
            ],
            log,
        )
        (out / "done").write_text("trained\n")
    return out / "checkpoints" / "last"


def checkpoint_for(method: str, budget: float, log: Path) -> tuple[Path, list]:
    """(policy directory, prune-eval flags to apply) for a cell, training what it needs."""
    base = base_policy()
    plan = recipe(method, budget)
    ckpt = base
    if plan.stage1:
        part = plan.merger if plan.vision_merge_ratio == 1.0 else f"vit_{plan.vision_merger}"
        name = f"stage1_r{plan.stage1:g}" if part == "learned_v2" else f"stage1_{part}_r{plan.stage1:g}"
        ckpt = _stage(name, ["--stage", "1", "--init_from", base, *plan.stage1_flags()], log)
    if plan.stage2:
        keep = ",".join(f"{k:g}" for k in plan.keep)
        name = f"stage2_{'m' if plan.stage1 else 'nom'}_{plan.objective}_k{keep.replace(',', '_')}"
        ckpt = _stage(name, ["--stage", "2", "--init_from", ckpt, "--objective", plan.objective, "--keep", keep], log)
    return ckpt, plan.apply_flags()


def closed_loop(checkpoint: Path, cell: Path) -> dict:
    """`craftvla eval` on every task (EPISODES unseen positions each, evaluation seed 0), once per cell."""
    if not (cell / "eval" / "results.json").is_file():
        sh(
            [
                BIN / "craftvla",
                "eval",
                "--checkpoint",
                checkpoint,
                "--tasks",
                TASKS,
                "--episodes",
                EPISODES,
                "--seed",
                "0",
                "--num_videos",
                "1",
                "--out",
                cell / "eval",
                "--overwrite",
                "true",
            ],
            cell / "cell.log",
        )
    return json.loads((cell / "eval" / "results.json").read_text())


def finished(result: Path) -> bool:
    """Whether `result` exists; refuses one made with another set-up (e.g. a smoke run's)."""
    if not result.is_file():
        return False
    setup = json.loads(result.read_text()).get("setup")
    if setup != SETUP:
        raise SystemExit(f"{result}: made with set-up {setup}, this run's is {SETUP}; move it away to redo it")
    return True


def twin_of(method: str, budget: float) -> str | None:
    """A finished cell of another method with the very same recipe at this budget (learned at 0.5
    is the merger alone), so the same policy is not evaluated twice."""
    for other in METHODS:
        if (
            other != method
            and recipe(other, budget) == recipe(method, budget)
            and finished(RESULTS / f"{other}__b{budget:g}.json")
        ):
            return f"{other}__b{budget:g}"
    return None


def run_cell(method: str, budget: float) -> Path:
    result = RESULTS / f"{method}__b{budget:g}.json"
    if finished(result):
        return result
    twin = twin_of(method, budget)
    if twin:
        write_json(result, {**json.loads((RESULTS / f"{twin}.json").read_text()), "method": method, "same_as": twin})
        return result
    cell = WORK / "cells" / f"{method}__b{budget:g}"
    log = cell / "cell.log"
    ckpt, flags = checkpoint_for(method, budget, log)
    pruned = cell / "policy"
    report = cell / "prune_eval.json"
    if not report.is_file():  # L1 unpruned/soft/hard, tokens, FLOPs; saves the configured pruned policy
        sh(
            [
                BIN / "craftvla",
                "prune",
                "eval",
                "--checkpoint",
                ckpt,
                *flags,
                "--dataset",
                HELD,
                "--samples",
                SAMPLES,
                "--batch_sizes",
                "1",
                "--repeats",
                "3",
                "--warmup",
                "1",
                "--out",
                report,
                "--save",
                pruned,
            ],
            log,
        )
    ev, pe = closed_loop(pruned, cell), json.loads(report.read_text())
    record = {
        "method": method,
        "budget": budget,
        "setup": SETUP,
        "recipe": recipe(method, budget).record(),
        **success_of(ev),
        "l1": pe["task_l1"]["hard"],
        "l1_soft": pe["task_l1"]["soft"],
        "l1_unpruned": pe["task_l1"]["unpruned"],
        "vision_tokens_per_layer": pe["tokens"]["vision_tokens_per_layer"],
        "flops": pe["speed"]["batch_1"]["hard"]["flops"],
        "flops_unpruned": pe["speed"]["batch_1"]["unpruned"]["flops"],
        "pruning": json.loads((pruned / "config.json").read_text())["pruning"],
    }  # rebuilds it for `latency`
    write_json(result, record)
    print(
        f"{method} @ {budget:g}: success {record['success']:.2f}  L1 {record['l1']:.4f}  "
        f"FLOPs x{record['flops'] / record['flops_unpruned']:.2f}",
        flush=True,
    )
    return result


def success_of(ev: dict) -> dict:
    """Mean success, per task, and the number of episodes behind them, from `craftvla eval`'s results."""
    return {
        "success": ev["mean_success_rate"],
        "per_task": {t: r["success_rate"] for t, r in ev["tasks"].items()},
        "episodes": sum(r["episodes"] for r in ev["tasks"].values()),
    }


def unpruned_row() -> Path:
    result = RESULTS / "unpruned.json"
    if not finished(result):
        cell = WORK / "cells" / "unpruned"
        base = base_policy()
        ev = closed_loop(base, cell)
        write_json(result, {"method": "unpruned", "budget": 1.0, "setup": SETUP, **success_of(ev), "l1": _l1(base)})
    return result


def _l1(checkpoint: Path) -> float:
    import torch

    from craftvla.craft.data import calibration_batches, open_anchor_dataset
    from craftvla.model.policy import VLAPolicy

    policy = VLAPolicy.from_pretrained(checkpoint).eval()
    total = 0.0
    with torch.no_grad():
        for batch in calibration_batches(open_anchor_dataset(str(HELD), policy), SAMPLES, seed=0):
            total += float(policy(batch)[0]) * len(batch["task"])
    return total / SAMPLES


def latency(threads: int = 2, repeats: int = 20, warmup: int = 5, rounds: int = 5) -> Path:
    """The unpruned base and every finished cell's pruned policy, timed in this one process.

    Each round times every policy (median of `repeats` calls after `warmup`), starting one place
    further along the list than the round before, so that no policy always runs first or right
    after the same neighbour; a policy's latency is the median of its round medians (at batch 1 a
    policy's round medians spread by about 20 % on this machine).
    Every round is written as it finishes, and a rerun goes on from the last one.

    A cell's policy is rebuilt from the committed base and the pruning config its result records
    (its learned parts freshly initialised): with fixed per-layer budgets the values of those
    weights do not change what is computed, and the cells' own folders do not outlive a session."""
    import statistics

    import torch

    from craftvla.config import PruningConfig
    from craftvla.model.policy import VLAPolicy
    from craftvla.model.speed import chunk_latency
    from craftvla.prune.module import apply_pruning

    torch.set_num_threads(threads)
    out, partial = RESULTS / "latency.json", WORK / "latency_rounds.json"
    configs = {"unpruned": None}
    for method, budget in cells():
        result = RESULTS / f"{method}__b{budget:g}.json"
        if finished(result) and "same_as" not in (record := json.loads(result.read_text())):
            configs[result.stem] = record["pruning"]
    done = json.loads(partial.read_text()) if partial.is_file() else []
    if done and set(done[0]) != set(configs):
        done = []  # another set of cells: start over
    policies, batches = {}, {size: None for size in (1, 8)}
    for name, pruning in configs.items():
        policy = VLAPolicy.from_pretrained(base_policy())
        if pruning is not None:
            apply_pruning(policy, PruningConfig(**pruning))
        policies[name] = policy.eval()
    for size in batches:
        torch.manual_seed(0)
        batches[size] = policies["unpruned"].config.fake_batch(size, seed=0)
    names = list(configs)
    for r in range(len(done), rounds):
        table = {}
        for name in names[r % len(names) :] + names[: r % len(names)]:
            table[name] = {
                f"batch_{size}": chunk_latency(policies[name], batches[size], warmup, repeats) for size in batches
            }
        done.append(table)
        write_json(partial, done)
        print(
            f"round {r + 1}/{rounds}:", {n: round(t["batch_1"]["median_ms"], 1) for n, t in table.items()}, flush=True
        )
    summary = {
        name: {
            key: {
                "median_ms": statistics.median(d[name][key]["median_ms"] for d in done),
                "round_medians_ms": [d[name][key]["median_ms"] for d in done],
                "repeats": repeats,
                "warmup": warmup,
                "rounds": rounds,
                "threads": threads,
            }
            for key in done[0][name]
        }
        for name in names
    }
    write_json(out, summary)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("verb", choices=("run", "latency", "report"))
    parser.add_argument(
        "--methods", default="all", help=f"comma-separated, or all: {', '.join([*METHODS, *ABLATIONS])}"
    )
    args = parser.parse_args(argv)
    if args.verb == "report":
        from report import write_report

        write_report(RESULTS, WORK if SMOKE else HERE)
        return 0
    if args.verb == "latency":
        latency()
        return 0
    WORK.mkdir(parents=True, exist_ok=True)
    prepare()
    unpruned_row()
    chosen = None if args.methods == "all" else set(args.methods.split(","))
    for method, budget in cells():
        if chosen is None or method in chosen:
            run_cell(method, budget)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main(sys.argv[1:]))
