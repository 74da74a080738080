"""`craftvla info --preset tiny`: a preset's config, token layout and parameter counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from craftvla.cli.parsing import parse_config
from craftvla.config import VLAConfig


@dataclass
class InfoConfig:
    # Preset name: tiny, tiny-256, small-pretrained or vla-adapter-qwen2.5-0.5b (craftvla.config.PRESETS).
    preset: str = "tiny"
    # Optional YAML policy config; replaces the preset.
    config: Optional[str] = None
    # Build on the meta device (no memory, no weights): shapes and counts only.
    meta: bool = True
    # A VLA-Adapter release or Prismatic run directory: print what it holds and what will load.
    weights_dir: Optional[str] = None


def describe(cfg: VLAConfig, meta: bool = True) -> str:
    from craftvla.model.policy import VLAPolicy

    with torch.device("meta" if meta else "cpu"):
        policy = VLAPolicy(cfg, load_weights=not meta)
    parts = {
        "vision": policy.vision,
        "projector": policy.projector,
        "llm": policy.llm,
        "action_queries": policy.action_queries,
        "action_head": policy.action_head,
    }
    n_vis = policy.vision.num_patches * len(cfg.camera_keys)
    lines = [
        f"preset {cfg.preset_name}: {cfg.vision.backbone_id} @ {cfg.vision.image_size}px x {len(cfg.camera_keys)} camera(s), "
        f"{cfg.llm.family} {policy.llm.num_layers} layers x {policy.llm.hidden_size} ({cfg.llm.attention}), head {cfg.head.type}",
        f"tokens: [BOS] + {n_vis} vision + <= {cfg.llm.max_text_tokens} text + {cfg.num_action_queries} queries + [STOP]",
        f"actions: chunk {cfg.chunk_size} x {cfg.action_dim}, state {cfg.state_dim}",
    ]
    for name, module in parts.items():
        lines.append(f"  {name:<15} {sum(p.numel() for p in module.parameters()) / 1e6:10.3f} M params")
    lines.append(f"  {'total':<15} {sum(p.numel() for p in policy.parameters()) / 1e6:10.3f} M params")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_config(InfoConfig, args=argv, prog="craftvla info")
    if args.weights_dir is not None:
        from pathlib import Path

        from craftvla.model.released import describe_release, release_config

        root = Path(args.weights_dir)
        print(describe_release(root))
        if (root / "dataset_statistics.json").is_file():
            print(describe(release_config(root), meta=True))
        return 0
    cfg = parse_config(VLAConfig, config_path=args.config) if args.config else VLAConfig.preset(args.preset)
    print(describe(cfg, meta=args.meta))
    return 0
