"""The retention study: what does fine-tuning the shipped generalist on a new task keep of the old ones?

    .venv/bin/python benchmarks/retention/study.py run [--methods plain,craft_actions_A] [--seeds 0,1,2]
    .venv/bin/python benchmarks/retention/study.py report      # results.md + tradeoff.png from results/

From the generalist (assets/generalist/checkpoint, task set A: 5 Meta-World tasks) every cell
fine-tunes on task set B (window-open, 50 expert demos) with one method and one seed, then measures
- success on B (20 unseen positions) and on A (10 per task, 50 in all; the evaluation seed stream),
- drift on A's data: the scale-free MSE (MSE / the generalist's variance across samples) of the
  pooled bridge features and of the predicted action chunks, fine-tuned vs generalist,
- a representation probe: the A-data L1 loss after re-fitting only the action head on A's data
  for `PROBE_STEPS` steps, against the generalist's (how much of A the VLM states still carry),
- for CRaFT: the fraction of steps with L_ret <= epsilon, and lambda at the end; wall-clock.
Every cell writes results/<method>__s<seed>.json when it finishes, and a rerun skips finished
cells (and a cell's finished stages: training, evaluation), so the study spans sessions.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from _lib import claim, run_parallel, sh, study_args, write_json  # noqa: E402

REPO = HERE.parents[1]
BIN = Path(os.environ.get("BIN", REPO / ".venv" / "bin"))
WORK = Path(os.environ.get("STUDY_WORK", REPO / "runs" / "retention"))
GENERALIST = Path(os.environ.get("STUDY_GENERALIST", REPO / "assets" / "generalist" / "checkpoint"))
TASKS_A = "drawer-close-v3,button-press-topdown-v3,door-open-v3,handle-press-v3,plate-slide-v3"
TASKS_B = "window-open-v3"
DATA_A, DATA_B = WORK / "data_A", WORK / "data_B"
RESULTS = Path(os.environ.get("STUDY_RESULTS", HERE / "results"))
# STUDY_* environment variables shrink a cell for a smoke run of the harness (never for results).
EVAL_EPISODES = {
    "B": int(os.environ.get("STUDY_EPISODES", 20)),  # unseen positions per task
    "A": int(os.environ.get("STUDY_EPISODES", 10)),
}  # x 5 tasks: 50 per cell
STEPS = int(os.environ.get("STUDY_STEPS", 300))
PROBE_STEPS = int(os.environ.get("STUDY_PROBE_STEPS", 100))

BASE = [
    "--steps",
    str(STEPS),
    "--batch_size",
    "32",
    "--optim.lr",
    "3e-4",
    "--checkpoint.save_freq",
    "0",
    "--log.log_freq",
    "10",
    "--dataset.num_workers",
    "1",
    "--log.plots",
    "false",
]
CRAFT = ["--craft.enabled", "true", "--craft.log_freq", "1"]
ON_A = ["--craft.anchor_dataset", "{A}", "--craft.anchor_batch_size", "16"]
MEMO = ["--craft.anchor_source", "memo", "--craft.anchor_frames", "1024"]
# issue 33's cost options spelled out, so that a later change of their defaults leaves these cells as run
EXACT = ["--craft.anchor_source", "online", "--craft.retention_every", "1"]
ON_A_EXACT = [*ON_A, *EXACT]  # (the cells of 2026-11 ran these as the defaults then, before the flags existed)


def craft(targets: str, eps: float = 0.1, dual_lr: float = 0.1) -> list[str]:
    return [*CRAFT, "--craft.targets", targets, "--craft.retention_budget", str(eps), "--craft.dual_lr", str(dual_lr)]


# name -> extra `craftvla train` flags ({A} / {B} / {CACHE_A} are filled in).
METHODS: dict[str, list[str]] = {
    "plain": [],
    "frozen_vlm": [
        "--freeze.vision",
        "true",
        "--freeze.projector",
        "true",
        "--freeze.llm",
        "true",
        "--freeze.action_queries",
        "true",
    ],
    "lora": ["--lora.rank", "16", "--freeze.vision", "true"],
    "l2_init": ["--craft.enabled", "true", "--craft.mode", "l2_init", "--craft.retention_weight", "0.1"],
    "distill_fixed": [
        "--craft.enabled",
        "true",
        "--craft.mode",
        "distill_fixed",
        "--craft.targets",
        "actions",
        "--craft.retention_weight",
        "1.0",
        *ON_A_EXACT,
    ],
    "replay2": ["--dataset.roots", "{B},{A}", "--dataset.weights", "0.98,0.02"],
    "replay10": ["--dataset.roots", "{B},{A}", "--dataset.weights", "0.9,0.1"],
    "replay50": ["--dataset.roots", "{B},{A}", "--dataset.weights", "0.5,0.5"],
    "craft_dual_only": [*craft("actions"), "--craft.mode", "dual_only", *ON_A_EXACT],
    "craft_pooled_B": craft("pooled"),
    "craft_actions_B": craft("actions"),
    "craft_pooled_A": [*craft("pooled"), *ON_A_EXACT],
    "craft_tokens_A": [*craft("tokens"), *ON_A_EXACT],
    "craft_actions_A": [*craft("actions"), *ON_A_EXACT],
    # `craftvla demo`'s CRaFT: the default dual step 0.01, so lambda stays near 1 under the budget
    "craft_demo": [*craft("actions", 0.1, 0.01), *ON_A_EXACT],
    # issue 33's cost levers, each against craft_demo (anchor batch 16, online teacher every step)
    **{f"craft_demo_a{n}": [*craft("actions", 0.1, 0.01), *ON_A[:3], str(n), *EXACT] for n in (8, 4)},
    **{
        f"craft_demo_every{k}": [
            *craft("actions", 0.1, 0.01),
            *ON_A,
            "--craft.anchor_source",
            "online",
            "--craft.retention_every",
            str(k),
        ]
        for k in (2, 4)
    },
    # the teacher's chunks kept per frame of a fixed anchor set of 1,024 frames (as the action cache holds)
    "craft_demo_memo": [*craft("actions", 0.1, 0.01), *ON_A, *MEMO, "--craft.retention_every", "1"],
    "craft_demo_memo_a8_every2": [*craft("actions", 0.1, 0.01), *ON_A[:3], "8", *MEMO, "--craft.retention_every", "2"],
    "craft_demo_memo_every4": [*craft("actions", 0.1, 0.01), *ON_A, *MEMO, "--craft.retention_every", "4"],
    "craft_all_A": [*craft("pooled,tokens,actions"), *ON_A_EXACT],
    "craft_actions_cacheA": [*craft("actions"), "--craft.anchor_cache", "{CACHE_A}", "--craft.anchor_batch_size", "16"],
    "craft_actions_A_replay2": [
        *craft("actions"),
        *ON_A_EXACT,
        "--dataset.roots",
        "{B},{A}",
        "--dataset.weights",
        "0.98,0.02",
    ],
    **{f"craft_actions_A_eps{eps:g}": [*craft("actions", eps), *ON_A_EXACT] for eps in (0.01, 0.03, 0.3, 1.0)},
}


def prepare() -> None:
    """Datasets A (as the generalist's run.sh collects them) and B, and the A action cache."""
    WORK.mkdir(parents=True, exist_ok=True)
    log = WORK / "prepare.log"
    if not (DATA_A / "meta" / "info.json").is_file():
        sh([BIN / "craftvla", "collect", "--out", DATA_A, "--tasks", TASKS_A, "--episodes", "50", "--seed", "0"], log)
    if not (DATA_B / "meta" / "info.json").is_file():
        sh(
            [BIN / "craftvla", "collect", "--out", DATA_B, "--tasks", TASKS_B, "--episodes", "50", "--seed", "1000"],
            log,
        )
    cache = WORK / "cache_A_actions"
    if not (cache / "meta.json").is_file():
        sh(
            [
                BIN / "craftvla",
                "cache",
                "build",
                "--checkpoint",
                GENERALIST,
                "--dataset",
                DATA_A,
                "--out",
                cache,
                "--target",
                "actions",
                "--dtype",
                "float32",
                "--num_samples",
                "1024",
            ],
            log,
        )


def fill(flags: list[str]) -> list[str]:
    names = {"{A}": str(DATA_A), "{B}": str(DATA_B), "{CACHE_A}": str(WORK / "cache_A_actions")}
    out = []
    for flag in flags:
        for key, value in names.items():
            flag = flag.replace(key, value)
        out.append(flag)
    return out


def train_cell(method: str, seed: int, cell: Path) -> Path:
    run = cell / "run"
    last = run / "checkpoints" / "last"
    if not last.exists():
        shutil.rmtree(run, ignore_errors=True)
        flags = fill(METHODS[method])
        data = [] if "--dataset.roots" in flags else ["--dataset.root", str(DATA_B)]
        sh(
            [
                BIN / "craftvla",
                "train",
                "--init_from",
                GENERALIST,
                *data,
                "--output_dir",
                run,
                *BASE,
                "--seed",
                str(seed),
                *flags,
            ],
            cell / "cell.log",
        )
    return last


def eval_cell(checkpoint: Path, cell: Path, tasks: str, name: str) -> dict:
    out = cell / f"eval_{name}"
    if not (out / "results.json").is_file():
        sh(
            [
                BIN / "craftvla",
                "eval",
                "--checkpoint",
                checkpoint,
                "--tasks",
                tasks,
                "--episodes",
                str(EVAL_EPISODES[name]),
                "--seed",
                "0",
                "--num_videos",
                "1",
                "--out",
                out,
                "--overwrite",
                "true",
            ],
            cell / "cell.log",
        )
    return json.loads((out / "results.json").read_text())


def _policy(path: Path):
    from craftvla.model.policy import VLAPolicy

    return VLAPolicy.from_pretrained(path).eval()


def drift_on_A(checkpoint: Path, samples: int = 256) -> dict:
    """Scale-free drift of pooled bridge features and action chunks on A's data, vs the generalist."""
    import torch

    from craftvla.craft.config import CraftConfig
    from craftvla.craft.data import calibration_batches, open_anchor_dataset
    from craftvla.craft.functional import retention_loss
    from craftvla.craft.targets import compute_targets, feature_variance

    gen, tuned = _policy(GENERALIST), _policy(checkpoint)
    cfg = CraftConfig(enabled=True, targets="pooled,actions")
    data = open_anchor_dataset(str(DATA_A), gen)
    feats = {"gen": {}, "tuned": {}}
    with torch.no_grad():
        for b in calibration_batches(data, samples, seed=123):
            for name, pol in (("gen", gen), ("tuned", tuned)):
                for k, v in compute_targets(pol, pol.encode(b), cfg).items():
                    feats[name].setdefault(k, []).append(v)
    out = {}
    for k in ("pooled", "actions"):
        g, t = torch.cat(feats["gen"][k]), torch.cat(feats["tuned"][k])
        out[f"drift_{k}"] = float(retention_loss(t, g, feature_variance(g)))
    return out


def head_probe(checkpoint: Path, cell: Path) -> dict:
    """A-data L1 of the tuned policy, after a head-only re-fit on A, and the generalist's."""
    out = cell / "probe"
    if not (out / "checkpoints" / "last").exists():
        shutil.rmtree(out, ignore_errors=True)
        sh(
            [
                BIN / "craftvla",
                "train",
                "--init_from",
                checkpoint,
                "--dataset.root",
                DATA_A,
                "--output_dir",
                out,
                "--steps",
                str(PROBE_STEPS),
                "--batch_size",
                "32",
                "--optim.lr",
                "1e-3",
                "--checkpoint.save_freq",
                "0",
                "--log.log_freq",
                "10",
                "--log.plots",
                "false",
                "--freeze.vision",
                "true",
                "--freeze.projector",
                "true",
                "--freeze.llm",
                "true",
                "--freeze.action_queries",
                "true",
            ],
            cell / "cell.log",
        )
    curve = [r["l1_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "l1_loss" in r]
    return {
        "l1_A_tuned": l1_on_A(checkpoint),
        "l1_A_refit": l1_on_A(out / "checkpoints" / "last"),
        "l1_A_generalist": l1_on_A(GENERALIST),
        "refit_l1_curve": curve,
    }  # training L1, every 10 steps


def l1_on_A(checkpoint: Path, samples: int = 512) -> float:
    """Mean L1 (normalised actions) on a fixed subset of A's frames."""
    import torch

    from craftvla.craft.data import calibration_batches, open_anchor_dataset

    policy = _policy(checkpoint)
    data = open_anchor_dataset(str(DATA_A), policy)
    total, n = 0.0, 0
    with torch.no_grad():
        for b in calibration_batches(data, samples, seed=321):
            loss, _ = policy(b)
            total, n = total + float(loss) * len(b["task"]), n + len(b["task"])
    return total / n


def run_cell(method: str, seed: int) -> Path | None:
    result = RESULTS / f"{method}__s{seed}.json"
    if result.is_file():
        return result
    cell = WORK / method / f"s{seed}"
    cell.mkdir(parents=True, exist_ok=True)
    if not claim(cell):
        return None
    try:
        return _run_cell(method, seed, cell, result)
    except SystemExit as err:  # a failed command: report it and go on with the other cells (a rerun retries)
        print(f"{method} seed {seed}: FAILED, see {cell / 'cell.log'}\n{err}", flush=True)
        return None
    finally:
        (cell / ".claim").unlink(missing_ok=True)


def _run_cell(method: str, seed: int, cell: Path, result: Path) -> Path:
    from craftvla.continual import run_summary

    t0 = time.time()
    last = train_cell(method, seed, cell)
    ev_b, ev_a = eval_cell(last, cell, TASKS_B, "B"), eval_cell(last, cell, TASKS_A, "A")
    record = {
        "method": method,
        "seed": seed,
        "flags": METHODS[method],
        "steps": STEPS,
        "success_B": ev_b["mean_success_rate"],
        "success_A": ev_a["mean_success_rate"],
        "per_task": {t: r["success_rate"] for ev in (ev_b, ev_a) for t, r in ev["tasks"].items()},
        **drift_on_A(last),
        **head_probe(last, cell),
        **run_summary(cell / "run"),
        "torch_threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
        "study_processes": int(os.environ.get("STUDY_PROCESSES", "1")),
        "cell_s": time.time() - t0,
    }
    write_json(result, record)
    print(
        f"{method} seed {seed}: B {record['success_B']:.2f}  A {record['success_A']:.2f}  ({record['cell_s']:.0f} s)",
        flush=True,
    )
    return result


def generalist_row() -> Path:
    """The starting point: the generalist's own success on B and A (same evaluation)."""
    result = RESULTS / "generalist.json"
    if not result.is_file():
        cell = WORK / "generalist"
        cell.mkdir(parents=True, exist_ok=True)
        ev_b, ev_a = eval_cell(GENERALIST, cell, TASKS_B, "B"), eval_cell(GENERALIST, cell, TASKS_A, "A")
        write_json(
            result,
            {
                "method": "generalist",
                "seed": 0,
                "success_B": ev_b["mean_success_rate"],
                "success_A": ev_a["mean_success_rate"],
                "per_task": {t: r["success_rate"] for ev in (ev_b, ev_a) for t, r in ev["tasks"].items()},
            },
        )
    return result


def main(argv: list[str]) -> int:
    args, methods = study_args(__doc__, list(METHODS), argv)
    if args.verb == "report":
        from report import write_report

        write_report(RESULTS, HERE, list(METHODS))
        return 0
    prepare()
    generalist_row()
    if args.processes > 1:
        return run_parallel(__file__, args.processes, argv)
    for seed in map(int, args.seeds.split(",")):  # seed-major: every method gets seed 0 first
        for method in methods:
            run_cell(method, seed)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main(sys.argv[1:]))
