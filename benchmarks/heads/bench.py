"""Closed-loop success per action head, on the same data and training budget as the shipped generalist.

    .venv/bin/python benchmarks/heads/bench.py run       # resumable: a training run and an evaluation per head
    .venv/bin/python benchmarks/heads/bench.py report    # results.md

Data: the generalist's (task set A: 5 Meta-World tasks, 50 expert demonstrations each at 64 px,
collection seed 0; `assets/generalist/run.sh` collects the same). Budget: the generalist's recipe,
tiny preset, 4,000 steps, batch 32, lr 1e-3, seed 0. l1_bridge is the shipped generalist itself
(assets/generalist, trained with exactly that recipe); the other heads replace the preset's head
(`--policy.head.type`, keeping its width, heads and flat read-out where the type has them).
Evaluation: 20 unseen positions per task, evaluation seed 0 (as the generalist's eval_results.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from _lib import sh, write_json  # noqa: E402

REPO = HERE.parents[1]
BIN = Path(os.environ.get("BIN", REPO / ".venv" / "bin"))
WORK = Path(os.environ.get("BENCH_WORK", REPO / "runs" / "heads"))
RESULTS = Path(os.environ.get("BENCH_RESULTS", HERE / "results"))
DATA = Path(os.environ.get("BENCH_DATA", REPO / "runs" / "generalist" / "data"))
TASKS = "drawer-close-v3,button-press-topdown-v3,door-open-v3,handle-press-v3,plate-slide-v3"
STEPS = int(os.environ.get("BENCH_STEPS", 4000))
EPISODES = int(os.environ.get("BENCH_EPISODES", 20))
HEADS = {  # name -> extra `craftvla train` flags (l1_bridge: the shipped generalist, not retrained)
    "l1_bridge": None,
    "flow_matching": ["--policy.head.type", "flow_matching"],
    "discrete": ["--policy.head.type", "discrete"],
    "discrete_ar": ["--policy.head.type", "discrete", "--policy.llm.attention", "causal"],
}


def checkpoint(head: str, log: Path) -> Path:
    if HEADS[head] is None:
        return REPO / "assets" / "generalist" / "checkpoint"
    run = WORK / head
    if not (run / "done").is_file():
        if not (DATA / "meta" / "info.json").is_file():
            sh([BIN / "craftvla", "collect", "--out", DATA, "--tasks", TASKS, "--episodes", "50", "--image_size", "64",
                "--seed", "0"], log)
        resume = ["--resume", "true"] if (run / "checkpoints" / "last").exists() else []
        sh([BIN / "craftvla", "train", "--preset", "tiny", *HEADS[head], "--dataset.root", DATA, "--output_dir", run,
            "--steps", STEPS, "--batch_size", "32", "--optim.lr", "1e-3", "--dataset.num_workers", "1",
            "--checkpoint.save_freq", "200", "--log.log_freq", "10", "--seed", "0", *resume], log)
        (run / "done").write_text("trained\n")
    return run / "checkpoints" / "last"


def run_head(head: str) -> None:
    result = RESULTS / f"{head}.json"
    if result.is_file():
        return
    log = WORK / f"{head}.log"
    ckpt = checkpoint(head, log)
    out = WORK / head / "eval"
    if not (out / "results.json").is_file():
        sh([BIN / "craftvla", "eval", "--checkpoint", ckpt, "--tasks", TASKS, "--episodes", EPISODES, "--seed", "0",
            "--num_videos", "1", "--out", out, "--overwrite", "true"], log)
    ev = json.loads((out / "results.json").read_text())
    train = REPO / "assets" / "generalist" / "train_metrics.jsonl" if HEADS[head] is None else WORK / head / "metrics.jsonl"
    train_s = max((json.loads(x).get("elapsed_s", 0) for x in train.read_text().splitlines()), default=None) \
        if train.is_file() else None
    write_json(result, {"head": head, "success": ev["mean_success_rate"], "train_s": train_s,
                        "per_task": {t: r["success_rate"] for t, r in ev["tasks"].items()}})
    print(f"{head}: {ev['mean_success_rate']:.2f}", flush=True)


def report() -> None:
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    tasks = TASKS.split(",")
    lines = ["# Closed-loop success per action head (same data and budget)", "",
             "Command: `.venv/bin/python benchmarks/heads/bench.py run` then `... report`; 20 unseen positions per task.", "",
             "| head | mean | " + " | ".join(t.removesuffix("-v3") for t in tasks) + " | training min |",
             "|---" * (len(tasks) + 3) + "|"]
    for r in rows:
        minutes = f"{r['train_s'] / 60:.0f}" if r.get("train_s") else "-"
        lines.append(f"| {r['head']} | {r['success']:.2f} | " + " | ".join(f"{r['per_task'].get(t, float('nan')):.2f}"
                                                                      for t in tasks) + f" | {minutes} |")
    (HERE / "results.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("verb", choices=("run", "report"))
    parser.add_argument("--heads", default=",".join(HEADS))
    args = parser.parse_args(argv)
    if args.verb == "report":
        report()
        return 0
    for head in args.heads.split(","):
        run_head(head)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
