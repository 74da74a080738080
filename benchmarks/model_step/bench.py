"""Forward and train-step time of a preset at a given batch size on this machine.

    .venv/bin/python benchmarks/model_step/bench.py --preset tiny --batch 16 --repeats 20

Forward (no grad, eval mode) and train step (forward + backward + AdamW step) are timed
interleaved, after warm-up, and the median and spread are written to results.json / results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from craftvla import VLAConfig, VLAPolicy


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = VLAConfig.preset(args.preset)
    policy = VLAPolicy(cfg)
    batch = cfg.fake_batch(args.batch)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4)

    def forward():
        policy.eval()
        policy.predict_action_chunk(batch)

    def train_step():
        policy.train()
        loss, _ = policy(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        forward(), train_step()
    fwd, step = [], []
    for _ in range(args.repeats):  # interleaved so load changes hit both alike
        fwd.append(timed(forward))
        step.append(timed(train_step))
    row = {
        "preset": args.preset,
        "batch": args.batch,
        "repeats": args.repeats,
        "params_M": round(sum(p.numel() for p in policy.parameters()) / 1e6, 3),
        "forward_ms_median": round(1e3 * statistics.median(fwd), 1),
        "forward_ms_min": round(1e3 * min(fwd), 1),
        "train_step_ms_median": round(1e3 * statistics.median(step), 1),
        "train_step_ms_min": round(1e3 * min(step), 1),
        "train_samples_per_s": round(args.batch / statistics.median(step), 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "load_avg_1m_at_start": os.getloadavg()[0],
    }
    print(json.dumps(row, indent=2))
    out = Path(__file__).parent
    (out / "results.json").write_text(json.dumps(row, indent=2) + "\n")
    (out / "results.md").write_text(
        "| preset | batch | params (M) | forward ms (median / min) | train step ms (median / min) | train samples/s |\n"
        "|---|---|---|---|---|---|\n"
        f"| {row['preset']} | {row['batch']} | {row['params_M']} | {row['forward_ms_median']} / {row['forward_ms_min']} | "
        f"{row['train_step_ms_median']} / {row['train_step_ms_min']} | {row['train_samples_per_s']} |\n\n"
        f"torch {row['torch']}, {row['threads']} threads, CPU; 1-min load average when it started: {row['load_avg_1m_at_start']:.1f}.\n"
        f"Command: `.venv/bin/python benchmarks/model_step/bench.py --preset {row['preset']} --batch {row['batch']} --repeats {row['repeats']}`\n"
    )


if __name__ == "__main__":
    main()
