"""Anchor-cache size and build throughput (issue 6).

1. Bytes per sample for the three cache targets (pooled, tokens, actions), inputs and targets
   separately, for the tiny and the real-shaped preset, computed from the model's own shapes
   (built on the meta device: no weights) at the builder's defaults (float16 targets and images,
   the middle layer, vision tokens, mean pooling). For the tiny preset the arithmetic is checked
   against the tensors of a cache actually built here.
2. Build throughput (samples/s) of `build_cache` on this CPU for the tiny preset, the three
   targets built one after the other in one run on the same synthetic anchor dataset.

    .venv/bin/python benchmarks/anchor_cache/bench.py [--samples 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from craftvla.config import VLAConfig
from craftvla.craft import cache as C
from craftvla.craft.cache_build import CacheBuildConfig, build_cache
from craftvla.craft.targets import TARGETS

HERE = Path(__file__).parent


def shapes(cfg: VLAConfig) -> dict:
    """Token counts and widths from a meta-device policy (the layout's own numbers)."""
    from craftvla.model.policy import VLAPolicy

    with torch.device("meta"):
        policy = VLAPolicy(cfg, load_weights=False)
    n_vis = policy.vision.num_patches * len(cfg.camera_keys)
    t_max, q = cfg.llm.max_text_tokens, cfg.num_action_queries
    return {
        "cams": len(cfg.camera_keys),
        "size": cfg.vision.image_size,
        "state": cfg.state_dim,
        "n_vis": n_vis,
        "t_max": t_max,
        "l_max": 1 + n_vis + t_max + q + 1,
        "width": policy.llm.hidden_size,
        "chunk": cfg.chunk_size,
        "action_dim": cfg.action_dim,
    }


def bytes_per_sample(s: dict, target_bytes: int = 2, image_bytes: int = 2) -> dict:
    """Inputs (images, float32 state, int64 ids, bool mask) and each target, in bytes."""
    inputs = s["cams"] * 3 * s["size"] ** 2 * image_bytes + 4 * s["state"] + 8 * s["t_max"] + s["t_max"]
    return {
        "inputs": inputs,
        "pooled": target_bytes * s["width"],  # (D,)
        "tokens": target_bytes * s["n_vis"] * s["width"] + s["n_vis"],  # (1, N_vis, D) + its mask (N_vis,)
        "actions": target_bytes * s["chunk"] * s["action_dim"],
    }  # (H, A)


def synth_dataset(root: Path, cfg: VLAConfig, frames: int) -> Path:
    from craftvla.data import LeRobotDatasetWriter

    rng = np.random.default_rng(0)
    size = cfg.vision.image_size
    features = {
        cfg.camera_keys[0]: {"dtype": "video", "shape": (size, size, 3), "names": None},
        "observation.state": {"dtype": "float32", "shape": (cfg.state_dim,), "names": None},
        "action": {"dtype": "float32", "shape": (cfg.action_dim,), "names": None},
    }
    writer = LeRobotDatasetWriter(root, fps=10, features=features)
    for ep in range(frames // 16):
        for _ in range(16):
            writer.add_frame(
                {
                    cfg.camera_keys[0]: rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
                    "observation.state": rng.normal(size=cfg.state_dim).astype(np.float32),
                    "action": rng.normal(size=cfg.action_dim).astype(np.float32),
                },
                task=["open the drawer", "press the button from the top"][ep % 2],
            )
        writer.save_episode()
    return writer.finalize()


def measured_bytes(path: Path) -> dict:
    """Per-sample bytes of the tensors actually stored (shard headers excluded)."""
    cache = C.AnchorCache(path)
    batch = cache.samples([0])
    target = C.target_key(cache.target)
    stored = {k: v for k, v in batch.items() if torch.is_tensor(v)}
    images = [k for k in stored if k.startswith("observation.images.")]
    inputs = sum(stored[k].numel() * 2 for k in images)  # the loader hands images out as float32; stored f16
    inputs += sum(stored[k].nbytes for k in ("observation.state", "input_ids", "attention_mask"))
    extra = stored[C.TOKEN_MASK_KEY].nbytes if C.TOKEN_MASK_KEY in stored else 0
    files = sum(f.stat().st_size for f in cache.files) / len(cache)
    return {"inputs": inputs, "target": stored[target].nbytes + extra, "file_bytes_per_sample": files}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for preset in ("tiny", "vla-adapter-qwen2.5-0.5b"):
        s = shapes(VLAConfig.preset(preset))
        rows.append((preset, s, bytes_per_sample(s)))
    cfg = VLAConfig.preset("tiny")
    results: dict = {"bytes": {p: {"shapes": s, **b} for p, s, b in rows}, "build": {}, "measured_tiny": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from craftvla.model.policy import VLAPolicy

        torch.manual_seed(0)
        VLAPolicy(cfg).save_pretrained(tmp / "ckpt")
        data = synth_dataset(tmp / "ds", cfg, args.samples)
        for kind in TARGETS:
            build = CacheBuildConfig(
                checkpoint=str(tmp / "ckpt"),
                dataset=str(data),
                out=str(tmp / kind),
                target=kind,
                num_samples=args.samples,
                shard_size=32,
                batch_size=16,
                device="cpu",
            )
            start = time.perf_counter()
            build_cache(build)  # includes loading the checkpoint and opening the dataset
            seconds = time.perf_counter() - start
            results["build"][kind] = {
                "samples": args.samples,
                "seconds": seconds,
                "samples_per_s": args.samples / seconds,
            }
            results["measured_tiny"][kind] = measured_bytes(tmp / kind)
    (HERE / "results.json").write_text(json.dumps(results, indent=1))
    print_table(results)
    return 0


def print_table(results: dict) -> None:
    print("| preset | N_vis | L_max | D | inputs B | pooled B | tokens B | actions B |")
    print("|---|---|---|---|---|---|---|---|")
    for preset, r in results["bytes"].items():
        s = r["shapes"]
        print(
            f"| {preset} | {s['n_vis']} | {s['l_max']} | {s['width']} | {r['inputs']:,} | {r['pooled']:,} "
            f"| {r['tokens']:,} | {r['actions']:,} |"
        )
    print("\ntiny, measured from built caches (tensor bytes per sample; file = shard files / samples):")
    for kind, m in results["measured_tiny"].items():
        b = results["build"][kind]
        print(
            f"  {kind:<8} inputs {m['inputs']:,} B  target {m['target']:,} B  file {m['file_bytes_per_sample']:,.0f} B"
            f"  build {b['samples_per_s']:.1f} samples/s ({b['samples']} in {b['seconds']:.2f} s)"
        )


if __name__ == "__main__":
    sys.exit(main())
