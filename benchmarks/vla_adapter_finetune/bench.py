"""Fine-tuning a VLA-Adapter release at its real shapes on this CPU: seconds per optimizer step and
peak memory, plain vs CRaFT (the actions target: the start policy's own chunks on an anchor batch,
online teacher, projection and dual variable), both with VLA-Adapter's LoRA recipe.

    .venv/bin/python benchmarks/vla_adapter_finetune/bench.py [--steps 4] [--batch 1] [--anchor_batch 1]

The model is the real-shaped preset with random weights -- the shapes of a release (DINOv2-L/14 with
registers + SigLIP-So400m at 224 px, two cameras: 512 vision tokens; Qwen2.5-0.5B; 64 queries; the Pro
head, 218 M parameters); `VLAPolicy.from_pretrained(<release>)` builds exactly this model. LoRA rank 32,
alpha 64 on every Linear of the towers, projector and LLM (their finetune.py); head, proprio projector
and queries train in full; AdamW. One warm-up step, then `--steps` timed steps (median). Each cell runs
in a fresh interpreter; its peak RSS is the kernel's (os.wait4). The instruction is tokenised by the
byte tokenizer (no Qwen2.5 tokenizer is shipped): a 47-character instruction is 47 tokens, where the
release's Qwen chat prompt would be ~56. Results: results/<cell>.json (a rerun skips finished cells),
results.md. The GPU version of these cells: benchmarks/gpu/run.sh.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from _lib import write_json  # noqa: E402

RESULTS = HERE / "results"
PRESET = "vla-adapter-qwen2.5-0.5b"
CELLS = ("plain", "craft_actions")
TASK = "put the black bowl on the plate next to the ramekin"


def lora_recipe():
    from craftvla.model.peft import LoraConfig

    return LoraConfig(rank=32, alpha=64.0, components=["vision", "projector", "llm"], target_modules=["all-linear"])


def step_fn(policy, cell: str, anchor_batch: int, optimizer=None):
    """One optimizer step as the training loop takes it (plain, or through the CRaFT plug-in);
    `optimizer` defaults to torch's AdamW over the trainable parameters."""
    import torch

    from craftvla.craft.config import CraftConfig
    from craftvla.craft.plugin import CraftPlugin

    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.AdamW(params, lr=1e-5)
    if cell == "plain":

        def step(batch):
            loss, _ = policy(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step
    anchors = [fake_batch(policy, anchor_batch, seed) for seed in (10, 11)]
    plugin = CraftPlugin(
        policy,
        CraftConfig(enabled=True, targets="actions", anchor_batch_size=anchor_batch),
        anchor_batches=lambda start: itertools.cycle(anchors),
    )

    def step(batch):
        plugin.backward(policy, batch)
        plugin.before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        plugin.after_optimizer_step()

    return step


def fake_batch(policy, size: int, seed: int) -> dict:
    """A batch of the policy's shapes on its device and in its dtype (the images and state)."""
    param = policy.action_queries.weight
    batch = policy.config.fake_batch(size, seed=seed)
    batch = {k: v.to(param.device, param.dtype if v.is_floating_point() else v.dtype) if hasattr(v, "to") else v
             for k, v in batch.items()}  # fmt: skip
    batch["task"] = [TASK] * size
    return batch


def run_cell(cell: str, steps: int, batch_size: int, anchor_batch: int) -> dict:
    import torch

    from craftvla import VLAConfig, VLAPolicy
    from craftvla.model.peft import apply_lora

    torch.set_num_threads(2)
    torch.manual_seed(0)
    started = time.perf_counter()
    policy = VLAPolicy(VLAConfig.preset(PRESET)).train()
    apply_lora(policy, lora_recipe())
    build_s = time.perf_counter() - started
    step = step_fn(policy, cell, anchor_batch)
    batch = fake_batch(policy, batch_size, 0)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        step(batch)
        if i:  # the first step warms up (allocations, lazy inits)
            times.append(time.perf_counter() - start)
    total = sum(p.numel() for p in policy.parameters())
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    return {
        "cell": cell,
        "seconds_per_step": statistics.median(times),
        "step_seconds": times,
        "build_seconds": build_s,
        "parameters": total,
        "trainable": trainable,
        "batch": batch_size,
        "anchor_batch": anchor_batch if cell != "plain" else None,
        "threads": 2,
        "torch": torch.__version__,
    }


def run_all(args) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    for cell in CELLS:
        out = RESULTS / f"{cell}__b{args.batch}.json"
        if out.is_file():
            print(f"{cell}: done ({out.name})")
            continue
        command = [sys.executable, __file__, "--cell", cell, "--steps", str(args.steps), "--batch", str(args.batch)]
        command += ["--anchor_batch", str(args.anchor_batch)]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        text = proc.stdout.read()
        if status != 0:
            raise SystemExit(f"{cell}: the cell failed (status {status})")
        row = json.loads(text.strip().splitlines()[-1])
        row["peak_rss_gb"] = usage.ru_maxrss / 2**20  # KiB -> GiB
        row["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        write_json(out, row)
        print(f"{cell}: {row['seconds_per_step']:.1f} s/step, peak RSS {row['peak_rss_gb']:.1f} GiB")
    report()


def report() -> None:
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    plain = {r["batch"]: r for r in rows if r["cell"] == "plain"}
    lines = [
        "# Fine-tuning a VLA-Adapter release at its real shapes, CPU (fp32, 2 threads)",
        "",
        "`.venv/bin/python benchmarks/vla_adapter_finetune/bench.py` (random weights at the release's shapes;",
        "LoRA rank 32 on every Linear of towers, projector and LLM; head, proprio projector, queries in full).",
        "",
        "| cell | batch | anchor batch | s / step (median) | x plain | peak RSS GiB | trainable / total params |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["batch"], CELLS.index(r["cell"]))):
        base = plain.get(r["batch"])
        ratio = f"{r['seconds_per_step'] / base['seconds_per_step']:.2f}x" if base else "-"
        lines.append(
            f"| {r['cell']} | {r['batch']} | {r['anchor_batch'] or '-'} | {r['seconds_per_step']:.1f} | {ratio} "
            f"| {r['peak_rss_gb']:.1f} | {r['trainable'] / 1e6:.0f} M / {r['parameters'] / 1e6:.0f} M |"
        )
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per cell (after one warm-up)")
    parser.add_argument("--batch", type=int, default=1, help="training batch")
    parser.add_argument("--anchor_batch", type=int, default=1, help="CRaFT's anchor batch")
    parser.add_argument("--cell", choices=CELLS, help="run one cell in this process and print its JSON")
    parser.add_argument("--report", action="store_true", help="only rewrite results.md")
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(run_cell(args.cell, args.steps, args.batch, args.anchor_batch)))
    elif args.report:
        report()
    else:
        run_all(args)


if __name__ == "__main__":
    main()
