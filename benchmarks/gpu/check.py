"""Every check that needs a CUDA GPU, in one command, in under 8 minutes on one GPU:

    .venv/bin/python benchmarks/gpu/check.py [--only latency,train,adamw_8bit,pruned]

1. latency    bf16 `predict_action_chunk` of the real-shaped preset (the shapes of a VLA-Adapter
              release, random weights) at batch 1, per head: vla_adapter (their Pro head) and
              l1_bridge; VLA-Adapter reports 36 ms per chunk for theirs.
2. train      bf16 fine-tuning steps with VLA-Adapter's LoRA recipe (rank 32 on every Linear of the
              towers, projector and LLM; head in full) at batch 1: plain and CRaFT-actions (online
              teacher, anchor batch 1): seconds per step and peak memory, against their 9.6 GB.
3. adamw_8bit the plain cell's steps with bitsandbytes' 8-bit AdamW (--optim.name adamw_8bit).
4. pruned     bf16 latency with the vision tokens merged to 25 % before the LLM (pool), inside the
              vision towers after a third of their blocks (pool_vit), and to 50 % before the LLM then 25 %
              inside it (learned merger + attention scorer, untrained weights: latency only), against
              unpruned, in one run.

Each check writes results/<check>.json as it finishes (a rerun skips finished checks) and
results.md collects them. Without CUDA it stops at once with one line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "vla_adapter_finetune"))
from _lib import write_json  # noqa: E402

RESULTS = HERE / "results"
CHECKS = ("latency", "train", "adamw_8bit", "pruned")
PRESET = "vla-adapter-qwen2.5-0.5b"
STEPS = 5


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/gpu/check.py: needs a CUDA GPU and torch sees none on this machine; nothing was run")
        raise SystemExit(2)


def build(head: str = "vla_adapter", pruning=None):
    """The real-shaped preset built directly on the GPU (random weights), eval mode."""
    import dataclasses

    import torch

    from craftvla import VLAConfig, VLAPolicy
    from craftvla.config import L1BridgeHeadConfig

    cfg = VLAConfig.preset(PRESET)
    if head == "l1_bridge":
        cfg = dataclasses.replace(cfg, head=L1BridgeHeadConfig(hidden_dim=896, num_heads=8, mlp_ratio=1))
    if pruning is not None:
        cfg = dataclasses.replace(cfg, pruning=pruning)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return VLAPolicy(cfg, load_weights=False).eval()


def latency_of(policy) -> dict:
    from bench import fake_batch

    from craftvla.model.speed import chunk_latency

    policy.set_inference_precision("bf16")
    return chunk_latency(policy, fake_batch(policy, 1, 0), warmup=10, repeats=50)


def check_latency() -> dict:
    return {head: latency_of(build(head)) for head in ("vla_adapter", "l1_bridge")} | {"reference_ms": 36.0}


def check_pruned() -> dict:
    from craftvla.config import PruningConfig

    configs = {
        "unpruned": None,
        "pool 25 %": PruningConfig(merger="pool", merge_ratio=0.25),
        "pool inside the towers 25 %": PruningConfig(vision_merge_ratio=0.25),
        "learned 50 % -> 25 %": PruningConfig(merger="learned", merge_ratio=0.5, scorer="attention", layers=[6], keep=[0.5]),
    }  # fmt: skip
    return {name: latency_of(build(pruning=cfg)) for name, cfg in configs.items()}


def train_cell(cell: str, optimizer_name: str = "adamw") -> dict:
    import torch
    from bench import fake_batch, lora_recipe, step_fn

    from craftvla.model.peft import apply_lora
    from craftvla.train.optim import OptimConfig, build_optimizer

    policy = build().train()
    apply_lora(policy, lora_recipe())
    policy.to(torch.bfloat16)  # as their finetune.py trains: bf16 weights, adapters included
    optimizer = build_optimizer(policy, OptimConfig(name=optimizer_name, lr=1e-5))
    step = step_fn(policy, cell, anchor_batch=1, optimizer=optimizer)
    batch = fake_batch(policy, 1, 0)
    step(batch)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(STEPS):
        start = time.perf_counter()
        step(batch)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {
        "seconds_per_step": sorted(times)[len(times) // 2],
        "step_seconds": times,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
        "optimizer": optimizer_name,
    }


def check_train() -> dict:
    rows = {cell: train_cell(cell) for cell in ("plain", "craft_actions")}
    return rows | {"reference_peak_gb": 9.6}


def check_adamw_8bit() -> dict:
    return {"plain": train_cell("plain", "adamw_8bit")}


def run(only: list[str]) -> None:
    import torch

    RESULTS.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0)
    for name in only:
        out = RESULTS / f"{name}.json"
        if out.is_file():
            print(f"{name}: done ({out.name})")
            continue
        started = time.perf_counter()
        try:
            row = {"result": globals()[f"check_{name}"](), "ok": True}
        except Exception as err:  # a failing check is recorded, and the others still run
            row = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        row |= {"check": name, "device": device, "torch": torch.__version__, "seconds": time.perf_counter() - started}
        write_json(out, row)
        print(f"{name}: {'ok' if row['ok'] else row['error']} ({row['seconds']:.0f} s)")
        torch.cuda.empty_cache()
    report()


def report() -> None:
    lines = ["# GPU checks (`benchmarks/gpu/check.py`)", ""]
    for name in CHECKS:
        path = RESULTS / f"{name}.json"
        if not path.is_file():
            lines.append(f"- {name}: not run yet")
            continue
        row = json.loads(path.read_text())
        body = json.dumps(row.get("result", row.get("error")), indent=1)
        lines += [f"## {name} ({row['device']}, torch {row['torch']})", "", "```", body, "```", ""]
    (HERE / "results.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {', '.join(CHECKS)}")
    args = parser.parse_args()
    only = args.only.split(",")
    unknown = [c for c in only if c not in CHECKS]
    if unknown:
        parser.error(f"unknown checks {unknown}; choose from {', '.join(CHECKS)}")
    require_cuda()
    run(only)


if __name__ == "__main__":
    main()
