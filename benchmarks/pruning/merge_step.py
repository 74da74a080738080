"""The merge step alone at the real shapes: what each way of merging inside the vision towers costs.

    .venv/bin/python benchmarks/pruning/merge_step.py     # ~2 min on this CPU (run it idle)

A whole chunk of the `vla-adapter-qwen2.5-0.5b` preset takes 7-11 s on this CPU and its round medians
spread by 5-30 %, so the 0.1 GFLOPs a learned merger adds cannot show in `real_shapes.py`. Here the
`TowerPool` of each merger (`pool`, `tome`, `learned_tome`, `learned_window`, `learned_v2`) runs by
itself on the towers' real shapes (2 cameras stacked on the batch axis, 16 x 16 patches, DINOv2's
width with its 5 prefix tokens, then SigLIP's; the LLM's width for the instruction): tower 0 (which
decides the sets), then tower 1, as the policy calls it. `--rounds` rounds time every merger (median of
`--repeats` calls after a warm-up) in an order rotated by one place per round; a merger's latency is
the median of its round medians. Results: results/merge_step_cpu.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from _lib import write_json  # noqa: E402

KINDS = ("pool", "tome", "learned_tome", "learned_window", "learned_v2")
RATIOS = (0.5, 0.25, 0.125)


def shapes(preset: str) -> dict:
    """The towers' widths and prefix tokens, the patch grid, the cameras and the instruction width of
    `preset` (only its vision towers are built)."""
    from craftvla import VLAConfig
    from craftvla.model.vision import VisionBackbone

    cfg = VLAConfig.preset(preset)
    vision = VisionBackbone(cfg.vision)
    return {
        "dims": [tower.embed_dim for tower in vision.towers],
        "prefixes": [tower.model.num_prefix_tokens for tower in vision.towers],
        "grid": int(round(vision.num_patches**0.5)),
        "text_dim": cfg.llm.hidden_size,
        "images": len(cfg.camera_keys),
    }


def merge_call(kind: str, ratio: float, shape: dict):
    """A function that merges both towers' tokens once, as the policy does (tower 0 decides)."""
    import torch

    from craftvla.prune.merger import TowerPool

    torch.manual_seed(0)
    pool = TowerPool(shape["grid"], ratio, 0.33, kind, shape["dims"], shape["text_dim"]).eval()
    n = shape["grid"] ** 2
    tokens = [
        torch.randn(shape["images"], p + n, d) for p, d in zip(shape["prefixes"], shape["dims"])
    ]  # (cameras * B, P + N, D)
    text = torch.randn(1, shape["text_dim"])

    def call():
        for tower, (prefix, x) in enumerate(zip(shape["prefixes"], tokens)):
            pool(x, prefix, tower, text)
        pool.sparsity.clear()

    return call


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="merge_step.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="vla-adapter-qwen2.5-0.5b", help="a craftvla preset (its towers' shapes)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds, each over every merger")
    parser.add_argument("--repeats", type=int, default=50, help="calls per merger per round (their median)")
    parser.add_argument("--out", default=str(HERE / "results" / "merge_step_cpu.json"), help="results file")
    args = parser.parse_args(argv)
    import torch

    from craftvla.model.speed import call_latency

    torch.set_num_threads(args.threads)
    shape = shapes(args.preset)
    calls = {f"{kind}__b{ratio:g}": merge_call(kind, ratio, shape) for ratio in RATIOS for kind in KINDS}
    names, rounds = list(calls), []
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        rounds.append({name: call_latency(calls[name], 5, args.repeats)["median_ms"] for name in order})
        print(f"round {r + 1}/{args.rounds}", flush=True)
    rows = {name: statistics.median(t[name] for t in rounds) for name in names}
    write_json(Path(args.out), {"setup": vars(args) | shape, "median_ms": rows, "rounds": rounds})
    print("| merger | " + " | ".join(f"{100 * r:g} %" for r in RATIOS) + " |")
    print("|---|" + "---|" * len(RATIOS))
    for kind in KINDS:
        print(f"| {kind} | " + " | ".join(f"{rows[f'{kind}__b{r:g}']:.2f} ms" for r in RATIOS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
