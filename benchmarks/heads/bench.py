"""Closed-loop success per action head, on the same data and training budget as the shipped generalist.

    .venv/bin/python benchmarks/heads/bench.py run       # resumable: a training run and an evaluation per head
    .venv/bin/python benchmarks/heads/bench.py report    # results.md

Data: the generalist's (task set A: 5 Meta-World tasks, 50 expert demonstrations each at 64 px,
collection seed 0; `assets/generalist/run.sh` collects the same). Budget: the generalist's recipe,
tiny preset, 4,000 steps, batch 32, lr 1e-3, seed 0. l1_bridge is the shipped generalist itself
(assets/generalist, trained with exactly that recipe); the other heads replace the preset's head
(`--policy.head.type`, keeping its width, heads and flat read-out where the type has them).
Evaluation: 20 unseen positions per task, evaluation seed 0 (as the generalist's eval_results.json),
and the sampled chunk's L1 against held-out demonstrations (10 per task, collection seed 500; 512
frames, normalised action units, padded steps excluded): task set A saturates closed-loop, the L1
still tells the heads apart.
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
SAMPLES = int(os.environ.get("BENCH_SAMPLES", 512))
HELD = WORK / "heldout"
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
            sh(
                [
                    BIN / "craftvla",
                    "collect",
                    "--out",
                    DATA,
                    "--tasks",
                    TASKS,
                    "--episodes",
                    "50",
                    "--image_size",
                    "64",
                    "--seed",
                    "0",
                ],
                log,
            )
        resume = ["--resume", "true"] if (run / "checkpoints" / "last").exists() else []
        sh(
            [
                BIN / "craftvla",
                "train",
                "--preset",
                "tiny",
                *HEADS[head],
                "--dataset.root",
                DATA,
                "--output_dir",
                run,
                "--steps",
                STEPS,
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
        sh(
            [
                BIN / "craftvla",
                "eval",
                "--checkpoint",
                ckpt,
                "--tasks",
                TASKS,
                "--episodes",
                EPISODES,
                "--seed",
                "0",
                "--num_videos",
                "1",
                "--out",
                out,
                "--overwrite",
                "true",
            ],
            log,
        )
    ev = json.loads((out / "results.json").read_text())
    train = (
        REPO / "assets" / "generalist" / "train_metrics.jsonl" if HEADS[head] is None else WORK / head / "metrics.jsonl"
    )
    train_s = (
        max((json.loads(x).get("elapsed_s", 0) for x in train.read_text().splitlines()), default=None)
        if train.is_file()
        else None
    )
    write_json(
        result,
        {
            "head": head,
            "success": ev["mean_success_rate"],
            "train_s": train_s,
            "per_task": {t: r["success_rate"] for t, r in ev["tasks"].items()},
        },
    )
    print(f"{head}: {ev['mean_success_rate']:.2f}", flush=True)


def add_heldout_l1(head: str) -> None:
    """Add the held-out L1 of the head's sampled chunks to its finished result file."""
    result = RESULTS / f"{head}.json"
    record = json.loads(result.read_text()) if result.is_file() else None
    if record is None or "heldout_l1" in record:
        return
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
                "10",
                "--image_size",
                "64",
                "--seed",
                "500",
            ],
            WORK / "heldout.log",
        )
    l1 = sampled_l1(checkpoint(head, WORK / f"{head}.log"))
    write_json(result, {**record, "heldout_l1": l1})
    print(f"{head}: held-out L1 {l1:.4f}", flush=True)


def sampled_l1(ckpt: Path) -> float:
    """Mean L1 between `predict_action_chunk` and the demonstrations' chunks (normalised units)."""
    import torch

    from craftvla.craft.data import calibration_batches, open_anchor_dataset
    from craftvla.keys import ACTION_KEY, ACTION_PAD_KEY
    from craftvla.model.heads.l1_bridge import l1_loss
    from craftvla.model.policy import VLAPolicy

    torch.manual_seed(0)  # the flow head samples its starting noise
    policy = VLAPolicy.from_pretrained(ckpt).eval()
    total = 0.0
    for batch in calibration_batches(open_anchor_dataset(str(HELD), policy), SAMPLES, seed=0):
        pred = policy.predict_action_chunk(batch)  # (B, H, A)
        total += float(l1_loss(pred, batch[ACTION_KEY], batch[ACTION_PAD_KEY])) * len(batch[ACTION_KEY])
    return total / SAMPLES


def report() -> None:
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    tasks = TASKS.split(",")
    lines = [
        "# Closed-loop success per action head (same data and budget)",
        "",
        "Command: `.venv/bin/python benchmarks/heads/bench.py run` then `... report`. Success: 20 unseen positions",
        "per task. Held-out L1: sampled chunks against 10 held-out demonstrations per task (512 frames, normalised",
        "units). Training minutes: wall clock on this 2-core machine (not side by side; see README).",
        "",
        "| head | mean | " + " | ".join(t.removesuffix("-v3") for t in tasks) + " | held-out L1 | training min |",
        "|---" * (len(tasks) + 4) + "|",
    ]
    for r in rows:
        minutes = f"{r['train_s'] / 60:.0f}" if r.get("train_s") else "-"
        l1 = f"{r['heldout_l1']:.4f}" if "heldout_l1" in r else "-"
        lines.append(
            f"| {r['head']} | {r['success']:.2f} | "
            + " | ".join(f"{r['per_task'].get(t, float('nan')):.2f}" for t in tasks)
            + f" | {l1} | {minutes} |"
        )
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
        add_heldout_l1(head)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
