"""Vision-token pruning: the learned pruners against baselines, at matched token budgets, on a base.

    .venv/bin/python benchmarks/pruning/bench.py run --base generalist   # data, learned stages, eval cells
    .venv/bin/python benchmarks/pruning/bench.py latency --base generalist   # every cell timed (run it idle)
    .venv/bin/python benchmarks/pruning/bench.py report --base generalist    # results.md + plots

Everything is resumable: each finished piece (dataset, training run, cell) is skipped on a rerun,
and training runs continue from their last checkpoint, so the benchmark spans sessions.

Two bases (`BASES`): `tiny-256` (256 vision tokens, trained here on 3 tasks at 128 px, no flat
read-out; its results in `results/`) and `generalist` (the shipped generalist of
`assets/generalist`: 64 vision tokens, 5 tasks at 64 px, 99 % success, a flat read-out of the patch
positions, which under merging reads each position's merged token; report and results in
`generalist/`). A budget b is the fraction of the base's vision tokens left after the last
reduction. Per method and budget, a cell: closed-loop success (`episodes` unseen positions per
task), held-out action L1 (demonstrations at another collection seed), vision tokens per LLM layer,
FLOPs per chunk; `latency` then times predict_action_chunk (batch 1 and 8, 2 threads, median of 20
after 5 warm-up calls; the median over 5 rounds in rotating order) for every cell in one process.
`--processes 2` shares the cells between two processes (one torch thread each; a cell is claimed).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from _lib import claim, run_parallel, sh, write_json  # noqa: E402
from methods import ABLATIONS, METHODS, recipe  # noqa: E402

REPO = HERE.parents[1]
BIN = Path(os.environ.get("BIN", REPO / ".venv" / "bin"))


@dataclass(frozen=True)
class Base:
    """What one benchmark prunes (a policy trained here from `preset`, or a shipped one) and how it
    is judged: its tasks, camera resolution, budgets and closed-loop episodes per task per cell."""

    name: str
    tasks: str
    image: int
    tokens: int  # its vision tokens (what a budget is a fraction of)
    budgets: tuple[float, ...]
    episodes: int
    preset: str = ""  # trained here for `base_steps` when `shipped` is None
    base_steps: int = 0
    shipped: Optional[str] = None  # a policy directory, relative to the repository
    cameras: str = ""  # `craftvla collect --cameras` (empty: its default)
    demos: int = 50
    stage_steps: int = 300
    samples: int = 512
    folder: str = ""  # its report under benchmarks/pruning/<folder>, its cells in <folder>/results

    def setup(self) -> dict:
        """What a result was made with; a rerun refuses results with another."""
        fields = {"image": self.image, "demos": self.demos, "stage_steps": self.stage_steps}
        fields |= {"episodes": self.episodes, "samples": self.samples}
        if self.shipped:
            return {"base": self.name, "checkpoint": self.shipped, **fields}
        return {"preset": self.preset, **fields, "base_steps": self.base_steps}  # the tiny-256 results' keys

    def base_setup(self) -> dict:
        return {"preset": self.preset, "image": self.image, "demos": self.demos, "base_steps": self.base_steps}


BASES = {
    "tiny-256": Base(
        name="tiny-256",
        tasks="drawer-close-v3,button-press-topdown-v3,handle-press-v3",
        image=128,
        tokens=256,
        budgets=(0.5, 0.25, 0.125),
        episodes=20,
        preset="tiny-256",
        base_steps=1500,
    ),
    # The shipped generalist: 99 % on its five tasks, and its actions need the image (the flat read-out
    # is what made button-press and door-open succeed, benchmarks/train_metaworld): it can tell.
    "generalist": Base(
        name="generalist",
        tasks="drawer-close-v3,button-press-topdown-v3,door-open-v3,handle-press-v3,plate-slide-v3",
        image=64,
        tokens=64,
        cameras="corner",
        budgets=(0.5, 0.25, 0.125, 0.0625, 0.03125),
        episodes=40,
        shipped="assets/generalist/checkpoint",
        folder="generalist",
    ),
}
# BENCH_* variables shrink everything for a smoke run of the harness (never for results); a smoke
# run gets its own folders, and every result records its set-up, so the two never mix.
SMOKE_VARS = {
    "BENCH_DEMOS": "demos",
    "BENCH_BASE_STEPS": "base_steps",
    "BENCH_STAGE_STEPS": "stage_steps",
    "BENCH_EPISODES": "episodes",
    "BENCH_SAMPLES": "samples",
    "BENCH_PRESET": "preset",
    "BENCH_IMAGE": "image",
}


@dataclass(frozen=True)
class Bench:
    """A base and where its run lives: `work` (data, training runs, cells; under runs/) and `results`."""

    base: Base
    smoke: bool = False

    @staticmethod
    def of(name: str) -> "Bench":
        base, smoke = BASES[name], {v: os.environ[k] for k, v in SMOKE_VARS.items() if k in os.environ}
        if smoke:
            types = {f.name: f.type for f in dataclasses.fields(Base)}
            base = dataclasses.replace(base, **{k: v if types[k] == "str" else int(v) for k, v in smoke.items()})
        return Bench(base, bool(smoke))

    @property
    def work(self) -> Path:
        default = REPO / "runs" / f"pruning{'-' + self.base.name if self.base.shipped else ''}"
        return Path(os.environ.get("BENCH_WORK", default.with_name(default.name + "-smoke") if self.smoke else default))

    @property
    def report_dir(self) -> Path:
        return self.work if self.smoke else HERE / self.base.folder

    @property
    def results(self) -> Path:
        return Path(os.environ.get("BENCH_RESULTS", self.report_dir / "results"))

    data = property(lambda self: self.work / "data")
    held = property(lambda self: self.work / "heldout")
    trained = property(lambda self: self.work / "base")  # the base trained here

    def cells(self) -> list[tuple[str, float]]:
        return [(m, b) for m in METHODS for b in self.base.budgets] + [(m, 0.25) for m in ABLATIONS]


# ----- the pieces -----------------------------------------------------------------------------------
def collect(bench: Bench, out: Path, episodes: int, seed: int, log: Path) -> None:
    """Expert demonstrations of the base's tasks at its resolution (skipped when there)."""
    if (out / "meta" / "info.json").is_file():
        return
    base = bench.base
    cameras = ["--cameras", base.cameras] if base.cameras else []
    args = ["collect", "--out", out, "--tasks", base.tasks, "--episodes", episodes, "--image_size", base.image]
    sh([BIN / "craftvla", *args, *cameras, "--seed", seed], log)


def prepare(bench: Bench) -> None:
    """Training and held-out demonstrations, and the unpruned base policy (trained here unless shipped)."""
    log = bench.work / "prepare.log"
    collect(bench, bench.data, bench.base.demos, 0, log)
    collect(bench, bench.held, max(2, bench.base.demos // 5), 500, log)
    if bench.base.shipped or (not bench.smoke and published(bench)):
        return
    out = bench.trained
    if not (out / "done").is_file():
        resume = ["--resume", "true"] if (out / "checkpoints" / "last").exists() else []
        args = ["--preset", bench.base.preset, "--dataset.root", bench.data, "--output_dir", out]
        args += ["--steps", bench.base.base_steps, "--batch_size", "32", "--optim.lr", "1e-3"]
        args += ["--dataset.num_workers", "1", "--checkpoint.save_freq", "200", "--log.log_freq", "10"]
        sh([BIN / "craftvla", "train", *args, "--seed", "0", *resume], log)
        (out / "done").write_text("trained\n")
    if not bench.smoke:
        publish(bench, out / "checkpoints" / "last", out / "metrics.jsonl")


# The trained tiny-256 base is committed (weights, config, statistics; about 55 minutes of CPU to
# redo): a session starts on a fresh machine, and everything else here is quick to rebuild.
PUBLISHED = HERE / "base_policy"


def base_policy(bench: Bench) -> Path:
    """The unpruned policy: the shipped one, the committed trained one, or a smoke run's own."""
    if bench.base.shipped:
        return REPO / bench.base.shipped
    return bench.trained / "checkpoints" / "last" if bench.smoke else PUBLISHED


def published(bench: Bench) -> bool:
    """Whether the committed base policy is there; refuses one trained with another set-up."""
    if not (PUBLISHED / "setup.json").is_file():
        return False
    setup = json.loads((PUBLISHED / "setup.json").read_text())
    if setup != bench.base.base_setup():
        raise SystemExit(
            f"{PUBLISHED}: trained with set-up {setup}, this run's is {bench.base.base_setup()}; move it away to redo it"
        )
    return True


def publish(bench: Bench, checkpoint: Path, metrics: Path) -> None:
    """Copy the trained policy (not its optimizer state) and its training log to PUBLISHED, atomically."""
    tmp = PUBLISHED.with_name(PUBLISHED.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(checkpoint.resolve(), tmp, ignore=shutil.ignore_patterns("training_state"))
    shutil.copy(metrics, tmp / "train_metrics.jsonl")
    write_json(tmp / "setup.json", bench.base.base_setup())
    os.replace(tmp, PUBLISHED)


def _stage(bench: Bench, name: str, args: list, log: Path) -> Path:
    """A `prune train` run (resumed if interrupted); returns its last checkpoint."""
    out = bench.work / name
    if not (out / "done").is_file():
        with claimed(out):
            resume = ["--resume", "true"] if (out / "checkpoints" / "last").exists() else []
            run = ["--dataset.root", bench.data, "--output_dir", out, "--steps", bench.base.stage_steps]
            run += ["--batch_size", "32", "--dataset.num_workers", "1", "--checkpoint.save_freq", "100"]
            sh([BIN / "craftvla", "prune", "train", *run, *args, *resume], log)
            (out / "done").write_text("trained\n")
    return out / "checkpoints" / "last"


def checkpoint_for(bench: Bench, method: str, budget: float, log: Path) -> tuple[Path, list]:
    """(policy directory, prune-eval flags to apply) for a cell, training what it needs."""
    base = base_policy(bench)
    plan = recipe(method, budget)
    ckpt = base
    if plan.stage1:
        part = plan.merger if plan.vision_merge_ratio == 1.0 else f"vit_{plan.vision_merger}"
        name = f"stage1_r{plan.stage1:g}" if part == "learned_v2" else f"stage1_{part}_r{plan.stage1:g}"
        ckpt = _stage(bench, name, ["--stage", "1", "--init_from", base, *plan.stage1_flags()], log)
    if plan.stage2:
        keep = ",".join(f"{k:g}" for k in plan.keep)
        name = f"stage2_{'m' if plan.stage1 else 'nom'}_{plan.objective}_k{keep.replace(',', '_')}"
        args = ["--stage", "2", "--init_from", ckpt, "--objective", plan.objective, "--keep", keep]
        ckpt = _stage(bench, name, args, log)
    return ckpt, plan.apply_flags()


def closed_loop(bench: Bench, checkpoint: Path, cell: Path) -> dict:
    """`craftvla eval` on every task (`episodes` unseen positions each, evaluation seed 0), once per cell."""
    if not (cell / "eval" / "results.json").is_file():
        args = ["--checkpoint", checkpoint, "--tasks", bench.base.tasks, "--episodes", bench.base.episodes]
        args += ["--seed", "0", "--num_videos", "1", "--out", cell / "eval", "--overwrite", "true"]
        sh([BIN / "craftvla", "eval", *args], cell / "cell.log")
    return json.loads((cell / "eval" / "results.json").read_text())


def finished(bench: Bench, result: Path) -> bool:
    """Whether `result` exists; refuses one made with another set-up (e.g. a smoke run's)."""
    if not result.is_file():
        return False
    setup = json.loads(result.read_text()).get("setup")
    if setup != bench.base.setup():
        raise SystemExit(f"{result}: made with set-up {setup}, this run's is {bench.base.setup()}; move it away")
    return True


def twin_of(bench: Bench, method: str, budget: float) -> str | None:
    """A finished cell of another method with the very same recipe at this budget (learned at 0.5
    is the merger alone), so the same policy is not evaluated twice."""
    for other in METHODS:
        if (
            other != method
            and recipe(other, budget) == recipe(method, budget)
            and finished(bench, bench.results / f"{other}__b{budget:g}.json")
        ):
            return f"{other}__b{budget:g}"
    return None


def run_cell(bench: Bench, method: str, budget: float) -> Path:
    result = bench.results / f"{method}__b{budget:g}.json"
    if finished(bench, result):
        return result
    twin = twin_of(bench, method, budget)
    if twin:
        record = json.loads((bench.results / f"{twin}.json").read_text())
        write_json(result, {**record, "method": method, "same_as": twin})
        return result
    cell = bench.work / "cells" / f"{method}__b{budget:g}"
    with claimed(cell):
        record = evaluate_cell(bench, method, budget, cell)
    write_json(result, record)
    print(
        f"{method} @ {budget:g}: success {record['success']:.2f}  L1 {record['l1']:.4f}  "
        f"FLOPs x{record['flops'] / record['flops_unpruned']:.2f}",
        flush=True,
    )
    return result


def evaluate_cell(bench: Bench, method: str, budget: float, cell: Path) -> dict:
    """A cell's record: what it needs trained, then `prune eval` (L1, tokens, FLOPs) and `eval`."""
    log = cell / "cell.log"
    ckpt, flags = checkpoint_for(bench, method, budget, log)
    pruned, report = cell / "policy", cell / "prune_eval.json"
    if not report.is_file():  # L1 unpruned/soft/hard, tokens, FLOPs; saves the configured pruned policy
        args = ["--checkpoint", ckpt, *flags, "--dataset", bench.held, "--samples", bench.base.samples]
        args += ["--batch_sizes", "1", "--repeats", "3", "--warmup", "1", "--out", report, "--save", pruned]
        sh([BIN / "craftvla", "prune", "eval", *args], log)
    ev, pe = closed_loop(bench, pruned, cell), json.loads(report.read_text())
    return {
        "method": method,
        "budget": budget,
        "setup": bench.base.setup(),
        "recipe": recipe(method, budget).record(),
        **success_of(ev),
        "l1": pe["task_l1"]["hard"],
        "l1_soft": pe["task_l1"]["soft"],
        "l1_unpruned": pe["task_l1"]["unpruned"],
        "vision_tokens_per_layer": pe["tokens"]["vision_tokens_per_layer"],
        "flops": pe["speed"]["batch_1"]["hard"]["flops"],
        "flops_unpruned": pe["speed"]["batch_1"]["unpruned"]["flops"],
        "pruning": json.loads((pruned / "config.json").read_text())["pruning"],  # rebuilds it for `latency`
    }


def success_of(ev: dict) -> dict:
    """Mean success, per task, and the number of episodes behind them, from `craftvla eval`'s results."""
    return {
        "success": ev["mean_success_rate"],
        "per_task": {t: r["success_rate"] for t, r in ev["tasks"].items()},
        "episodes": sum(r["episodes"] for r in ev["tasks"].values()),
    }


def unpruned_row(bench: Bench) -> Path:
    result = bench.results / "unpruned.json"
    if not finished(bench, result):
        base = base_policy(bench)
        ev = closed_loop(bench, base, bench.work / "cells" / "unpruned")
        record = {"method": "unpruned", "budget": 1.0, "setup": bench.base.setup(), **success_of(ev)}
        write_json(result, {**record, "l1": _l1(bench, base)})
    return result


def _l1(bench: Bench, checkpoint: Path) -> float:
    import torch

    from craftvla.craft.data import calibration_batches, open_anchor_dataset
    from craftvla.model.policy import VLAPolicy

    policy = VLAPolicy.from_pretrained(checkpoint).eval()
    total, samples = 0.0, bench.base.samples
    with torch.no_grad():
        for batch in calibration_batches(open_anchor_dataset(str(bench.held), policy), samples, seed=0):
            total += float(policy(batch)[0]) * len(batch["task"])
    return total / samples


def latency(bench: Bench, threads: int = 2, repeats: int = 20, warmup: int = 5, rounds: int = 5) -> Path:
    """The unpruned base and every finished cell's pruned policy, timed in this one process.

    Each round times every policy (median of `repeats` calls after `warmup`), starting one place
    further along the list than the round before, so that no policy always runs first or right
    after the same neighbour; a policy's latency is the median of its round medians (at batch 1 a
    policy's round medians spread by about 20 % on this machine).
    Every round is written as it finishes, and a rerun goes on from the last one.

    A cell's policy is rebuilt from the base and the pruning config its result records (its learned
    parts freshly initialised): with fixed per-layer budgets the values of those weights do not
    change what is computed, and the cells' own folders do not outlive a session."""
    import statistics

    import torch

    from craftvla.config import PruningConfig
    from craftvla.model.policy import VLAPolicy
    from craftvla.model.speed import chunk_latency
    from craftvla.prune.module import apply_pruning

    torch.set_num_threads(threads)
    out, partial = bench.results / "latency.json", bench.work / "latency_rounds.json"
    configs = {"unpruned": None}
    for method, budget in bench.cells():
        result = bench.results / f"{method}__b{budget:g}.json"
        if finished(bench, result) and "same_as" not in (record := json.loads(result.read_text())):
            configs[result.stem] = record["pruning"]
    done = json.loads(partial.read_text()) if partial.is_file() else []
    if done and set(done[0]) != set(configs):
        done = []  # another set of cells: start over
    policies, batches = {}, {size: None for size in (1, 8)}
    for name, pruning in configs.items():
        policy = VLAPolicy.from_pretrained(base_policy(bench))
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


class Busy(Exception):
    """Another benchmark process holds a piece this cell needs (`--processes`): try it later."""


def run_all(bench: Bench, chosen: Optional[set[str]]) -> None:
    """Every chosen cell; with several processes, each claims a cell (and any stage it trains) first,
    and a cell whose piece another process holds is tried again after the others."""
    pending = [(m, b) for m, b in bench.cells() if chosen is None or m in chosen]
    while pending:
        deferred = []
        for method, budget in pending:
            try:
                run_cell(bench, method, budget)
            except Busy:
                deferred.append((method, budget))
        if deferred and len(deferred) == len(pending):
            time.sleep(30)  # everything left is held by another process
        pending = deferred


@contextlib.contextmanager
def claimed(folder: Path):
    """Hold `folder` for this process while inside (raises Busy when another live process holds it)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not claim(folder):
        raise Busy(folder)
    try:
        yield
    finally:
        (folder / ".claim").unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("verb", choices=("run", "latency", "report"))
    parser.add_argument("--base", default="tiny-256", choices=sorted(BASES), help="the policy every method prunes")
    parser.add_argument(
        "--methods", default="all", help=f"comma-separated, or all: {', '.join([*METHODS, *ABLATIONS])}"
    )
    parser.add_argument(
        "--processes", type=int, default=1, help="processes sharing the cells (run), one torch thread each"
    )
    args = parser.parse_args(argv)
    bench = Bench.of(args.base)
    if args.verb == "report":
        from report import write_report

        write_report(bench.results, bench.report_dir, bench.base.tokens, f"bench.py run --base {bench.base.name}")
        return 0
    if args.verb == "latency":
        latency(bench)
        return 0
    bench.work.mkdir(parents=True, exist_ok=True)
    prepare(bench)
    unpruned_row(bench)
    if args.processes > 1:
        return run_parallel(__file__, args.processes, argv)
    run_all(bench, None if args.methods == "all" else set(args.methods.split(",")))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main(sys.argv[1:]))
