"""predict_action_chunk latency per action head, eager vs torch.compile, at two model sizes.

    .venv/bin/python benchmarks/inference/bench.py run        # resumable: one result file per cell
    .venv/bin/python benchmarks/inference/bench.py report     # results.md

Cells: preset (tiny; vla-adapter-qwen2.5-0.5b = the real shapes with random weights: DINOv2 +
SigLIP at 224 px, Qwen2.5-0.5B, 64 queries) x head (l1_bridge; flow_matching, 10 Euler steps;
discrete, parallel slots; discrete_ar, causal LLM, KV cache) x batch (1, 8) x mode (eager,
compiled). Each cell: `threads` torch threads, `warmup` untimed calls, the median of `repeats`
timed calls (model/speed.py); compiled cells also record the compilation time (first call).
`--device cuda` runs the same cells on a GPU with bf16 autocast (`set_inference_precision("auto")`);
their result files and rows carry the device.
Random weights at real shapes use the byte tokenizer (the real Qwen vocabulary only changes the
embedding table's size). Run it on an idle machine: every cell is timed in its own process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from _lib import write_json  # noqa: E402

RESULTS = Path(os.environ.get("BENCH_RESULTS", HERE / "results"))
PRESETS = ("tiny", "vla-adapter-qwen2.5-0.5b")
HEADS = ("l1_bridge", "vla_adapter", "flow_matching", "discrete", "discrete_ar")
BATCHES = (1, 8)
MODES = ("eager", "compiled")


def policy_config(preset: str, head: str):
    """The preset with `head` in place of its own. The bridge heads (l1_bridge, flow_matching) take the
    preset's own when it is one, else a VLA-Adapter-sized one (the LLM's width, its heads, a 1x MLP)."""
    from craftvla.config import (
        DiscreteHeadConfig,
        FlowMatchingHeadConfig,
        L1BridgeHeadConfig,
        VLAAdapterHeadConfig,
        VLAConfig,
    )

    cfg = VLAConfig.preset(preset)
    cfg.llm.tokenizer, cfg.llm.weights_dir, cfg.vision.weights_dir, cfg.weights_dir = "bytes", None, None, None
    own = cfg.head
    bridge = (
        own
        if isinstance(own, L1BridgeHeadConfig)
        else L1BridgeHeadConfig(hidden_dim=cfg.llm.hidden_size, num_heads=own.num_heads, mlp_ratio=1)
    )
    bridge = {f.name: getattr(bridge, f.name) for f in dataclasses.fields(L1BridgeHeadConfig)}
    if head == "l1_bridge":
        cfg = dataclasses.replace(cfg, head=L1BridgeHeadConfig(**bridge))
    elif head == "vla_adapter":
        cfg = dataclasses.replace(cfg, head=own if isinstance(own, VLAAdapterHeadConfig) else VLAAdapterHeadConfig())
    elif head == "flow_matching":
        cfg = dataclasses.replace(cfg, head=FlowMatchingHeadConfig(**bridge))
    elif head.startswith("discrete"):  # parallel slots need bidirectional attention; the KV cache a causal LLM
        cfg.llm.attention = "causal" if head == "discrete_ar" else "bidirectional"
        cfg = dataclasses.replace(cfg, head=DiscreteHeadConfig(num_heads=own.num_heads))
    return cfg


def measure(
    preset: str, head: str, batch: int, mode: str, threads: int, warmup: int, repeats: int, device: str = "cpu"
) -> dict:
    import torch

    from craftvla.model.policy import VLAPolicy
    from craftvla.model.speed import chunk_latency

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = policy_config(preset, head)
    policy = VLAPolicy(cfg, load_weights=False).eval().to(device).set_inference_precision("auto")
    inputs = cfg.fake_batch(batch, seed=0)
    inputs.pop("action")  # an observation: no answer in it
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    record = {
        "preset": preset,
        "head": head,
        "batch": batch,
        "mode": mode,
        "llm_attention": cfg.llm.attention,
        "params_m": sum(p.numel() for p in policy.parameters()) / 1e6,
        "device": device,
        "dtype": str(policy.inference_dtype or torch.float32).removeprefix("torch."),
    }
    if mode == "compiled":
        policy.compile_inference()
        start = time.perf_counter()
        policy.predict_action_chunk(inputs)
        record["compile_s"] = time.perf_counter() - start
    return {**record, **chunk_latency(policy, inputs, warmup, repeats)}


def cells(presets, heads, batches=BATCHES, modes=MODES) -> list[tuple]:
    return [(p, h, b, m) for p in presets for h in heads for b in batches for m in modes]


def run(args) -> None:
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("bench.py: --device cuda, but torch sees no CUDA device on this machine")
    batches, modes = [int(b) for b in args.batches.split(",")], args.modes.split(",")
    for preset, head, batch, mode in cells(args.presets.split(","), args.heads.split(","), batches, modes):
        out = RESULTS / f"{preset}__{head}__b{batch}__{mode}{'' if args.device == 'cpu' else '__' + args.device}.json"
        if out.is_file():
            continue
        cmd = [
            sys.executable,
            __file__,
            "cell",
            preset,
            head,
            str(batch),
            mode,
            "--threads",
            str(args.threads),
            "--warmup",
            str(args.warmup),
            "--repeats",
            str(args.repeats),
            "--device",
            args.device,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(f"{out.name}: FAILED\n{done.stderr[-2000:]}", flush=True)
            continue
        write_json(out, json.loads(done.stdout.strip().splitlines()[-1]))
        print(out.name, round(json.loads(out.read_text())["median_ms"], 2), "ms", flush=True)


def report() -> None:
    rows = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    lines = [
        "# predict_action_chunk latency per head",
        "",
        "Command: `.venv/bin/python benchmarks/inference/bench.py run` then `... report`; median ms "
        "(10th-90th percentile) of the timed calls; CPU rows in fp32 at the torch threads listed, CUDA "
        "rows under bf16 autocast.",
        "",
        "| preset | device | head | batch | eager ms | compiled ms | compiled speed-up | compile s | threads |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    table = {}
    for r in rows:
        device = f"{r.get('device', 'cpu')} {r.get('dtype', 'float32')}"
        table.setdefault((r["preset"], device, r["head"], r["batch"]), {})[r["mode"]] = r
    for (preset, device, head, batch), modes in sorted(table.items()):
        e, c = modes.get("eager"), modes.get("compiled")
        fmt = lambda r: f"{r['median_ms']:.1f} ({r['p10_ms']:.1f}-{r['p90_ms']:.1f})" if r else "-"
        speed = f"{e['median_ms'] / c['median_ms']:.2f}x" if e and c else "-"
        compile_s = f"{c['compile_s']:.0f}" if c else "-"
        lines.append(
            f"| {preset} | {device} | {head} | {batch} | {fmt(e)} | {fmt(c)} | {speed} | {compile_s} | "
            f"{(e or c)['threads']} |"
        )
    (HERE / "results.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("verb", choices=("run", "report", "cell"))
    parser.add_argument("cell", nargs="*", help="(internal) preset head batch mode")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--heads", default=",".join(HEADS))
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes")
    parser.add_argument("--modes", default=",".join(MODES), help="eager, compiled or both")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: bf16 autocast on a GPU")
    args = parser.parse_args(argv)
    if args.verb == "cell":
        preset, head, batch, mode = args.cell
        print(json.dumps(measure(preset, head, int(batch), mode, args.threads, args.warmup, args.repeats, args.device)))
    elif args.verb == "run":
        run(args)
    else:
        report()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
