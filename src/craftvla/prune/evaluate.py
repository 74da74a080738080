"""`craftvla prune eval`: what pruning costs and saves, unpruned vs soft vs hard, in one report.

    craftvla prune eval --dataset HELD_OUT                       # runs/prune/stage2/checkpoints/last
    craftvla prune eval --checkpoint POLICY --dataset D --merger pool --scorer fastv --keep 0.5,0.25

Reports the task loss (action L1 on `samples` frames of a held-out LeRobot dataset) of the policy
unpruned (its pruning switched off), soft (training's masks, no noise) and hard (tokens removed),
the vision tokens entering every LLM layer and the kept fraction at each pruning layer, FLOPs of
one `predict_action_chunk` (torch's FlopCounterMode) and its measured latency at each batch size.
Pruning flags apply a pruning config to the checkpoint first: the parameter-free baselines (pool,
tome, random, fastv, instruction) at any budget, evaluated in the same harness as the learned ones.
Closed-loop success: `craftvla eval --checkpoint` on a saved pruned policy (`--save DIR`).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from craftvla.cli.parsing import number_list, parse_config
from craftvla.config import PruningConfig
from craftvla.errors import ConfigError, require
from craftvla.files import write_json_atomic

log = logging.getLogger("craftvla.prune")


@dataclass
class PruneEvalConfig:
    # The policy (a save_pretrained directory; what `prune train --stage 2` writes by default).
    checkpoint: str = "runs/prune/stage2/checkpoints/last"
    # Held-out LeRobot v3 dataset for the task loss; None = skip the task loss (FLOPs and latency only).
    dataset: Optional[str] = None
    # Frames of `dataset` (a seeded random subset) for the task loss.
    samples: int = 256
    # Pruning to apply over the checkpoint's (each None = the checkpoint's value; see PruningConfig):
    # the fraction of each image's patches left after pooling inside the vision towers (1 = off),
    vision_merge_ratio: Optional[float] = None
    # and the fraction of the towers' blocks that run before that pooling;
    vision_merge_depth: Optional[float] = None
    # how the towers merge: pool or tome (parameter-free), learned_window, learned_tome or learned_v2
    # (train them: prune train --stage 1);
    vision_merger: Optional[str] = None
    # the merger before the LLM (learned, learned_v2, learned_window, learned_tome, pool, tome, none).
    merger: Optional[str] = None
    # Fraction of the vision tokens the merger keeps.
    merge_ratio: Optional[float] = None
    # Token scorer inside the LLM (attention, mlp, random, fastv, instruction, none).
    scorer: Optional[str] = None
    # LLM layers after which tokens are selected, comma-separated, e.g. 1,2.
    layers: Optional[str] = None
    # Kept fraction after each selection, comma-separated, e.g. 0.5,0.25.
    keep: Optional[str] = None
    # Batch sizes of the latency measurement, comma-separated.
    batch_sizes: str = "1,8"
    # Untimed calls before each latency measurement.
    warmup: int = 5
    # Timed calls per measurement (the median is reported).
    repeats: int = 20
    # torch threads during the measurement (0 = leave torch's setting).
    threads: int = 2
    # Write the report as JSON here (atomically); None = print only.
    out: Optional[str] = None
    # Save the (re-)configured pruned policy here, e.g. for `craftvla eval`; None = do not save.
    save: Optional[str] = None
    # Seed of the task-loss frame subset and of the latency batches.
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.samples >= 1, "samples", self.samples, "must be >= 1")
        require(self.repeats >= 3, "repeats", self.repeats, "must be >= 3 (a median of fewer says little)")
        require(
            all(b >= 1 for b in number_list(self.batch_sizes, "batch_sizes", int)) and self.batch_sizes,
            "batch_sizes",
            self.batch_sizes,
            "comma-separated sizes >= 1",
        )


def configured(cfg: PruneEvalConfig, current: PruningConfig) -> PruningConfig:
    """The checkpoint's pruning config with the flags given applied."""
    return PruningConfig(
        vision_merge_ratio=cfg.vision_merge_ratio or current.vision_merge_ratio,
        vision_merge_depth=current.vision_merge_depth if cfg.vision_merge_depth is None else cfg.vision_merge_depth,
        vision_merger=cfg.vision_merger or current.vision_merger,
        merger=cfg.merger or current.merger,
        merge_ratio=cfg.merge_ratio or current.merge_ratio,
        scorer=cfg.scorer or current.scorer,
        layers=number_list(cfg.layers, "layers", int) or list(current.layers),
        keep=number_list(cfg.keep, "keep") or list(current.keep),
        hidden_dim=current.hidden_dim,
    )


def task_losses(policy, dataset_root: str, samples: int, seed: int) -> dict[str, float]:
    """Mean task loss on the same frames: unpruned, soft (no noise) and hard."""
    from craftvla.craft.data import calibration_batches, open_anchor_dataset

    data = open_anchor_dataset(dataset_root, policy)
    batches = list(calibration_batches(data, samples, seed=seed))
    out = {}
    for mode in ("unpruned", "soft", "hard"):
        policy.pruning.set_soft(mode == "soft", noise=False)
        torch.manual_seed(seed)  # the random baseline draws the same tokens in every mode
        total = 0.0
        with torch.no_grad(), policy.pruning.disabled() if mode == "unpruned" else contextlib.nullcontext():
            for batch in batches:
                loss, _ = policy(batch)
                total += float(loss) * len(batch["task"])
        out[mode] = total / samples if len(batches) else float("nan")
    policy.pruning.set_soft(False)
    return out


def token_profile(policy, batch: dict) -> dict:
    """Vision tokens in each hidden state (hard), and the pruning stats of that forward."""
    with torch.no_grad():
        context = policy.encode(batch)
    return {
        "vision_tokens_per_layer": [layout.num_vision for layout in context.layouts],
        "sequence_per_layer": [layout.seq_len for layout in context.layouts],
        **{k: float(v) for k, v in context.pruning.items()},
    }


def speed(policy, config, batch_sizes: list[int], warmup: int, repeats: int, seed: int) -> dict:
    """FLOPs and latency, unpruned vs hard, per batch size."""
    from craftvla.model.speed import chunk_flops, chunk_latency

    out = {}
    for size in batch_sizes:
        batch = config.fake_batch(size, seed=seed)
        row = {}
        for mode in ("unpruned", "hard"):
            with policy.pruning.disabled() if mode == "unpruned" else contextlib.nullcontext():
                row[mode] = {"flops": chunk_flops(policy, batch), **chunk_latency(policy, batch, warmup, repeats)}
        row["flops_ratio"] = row["hard"]["flops"] / row["unpruned"]["flops"]
        row["speedup"] = row["unpruned"]["median_ms"] / row["hard"]["median_ms"]
        out[f"batch_{size}"] = row
    return out


def evaluate(cfg: PruneEvalConfig) -> dict:
    from craftvla.model.policy import VLAPolicy
    from craftvla.prune.module import apply_pruning

    if not Path(cfg.checkpoint).is_dir():
        raise ConfigError(f"checkpoint={cfg.checkpoint!r}: no such directory")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    policy = VLAPolicy.from_pretrained(cfg.checkpoint).eval()
    pruning = configured(cfg, policy.config.pruning)
    if not pruning.enabled:
        raise ConfigError(f"{cfg.checkpoint} has no pruning: pass --merger and/or --scorer (e.g. --scorer fastv)")
    apply_pruning(policy, pruning).eval()
    report = {
        "checkpoint": cfg.checkpoint,
        "pruning": policy.config.pruning.__dict__ | {"schedule": policy.config.pruning.schedule(policy.llm.num_layers)},
    }
    torch.manual_seed(cfg.seed)
    report["tokens"] = token_profile(policy, policy.config.fake_batch(2, seed=cfg.seed))
    if cfg.dataset is not None:
        report["task_l1"] = task_losses(policy, cfg.dataset, cfg.samples, cfg.seed)
    sizes = number_list(cfg.batch_sizes, "batch_sizes", int)
    report["speed"] = speed(policy, policy.config, sizes, cfg.warmup, cfg.repeats, cfg.seed)
    if cfg.save:
        policy.save_pretrained(cfg.save)
    return report


def summary(report: dict) -> str:
    lines = [
        f"pruning: {report['pruning']}",
        f"vision tokens per LLM layer (hard): {report['tokens']['vision_tokens_per_layer']}",
    ]
    if "task_l1" in report:
        lines.append("task L1: " + ", ".join(f"{k} {v:.4f}" for k, v in report["task_l1"].items()))
    for name, row in report["speed"].items():
        lines.append(
            f"{name}: {row['unpruned']['median_ms']:.2f} ms -> {row['hard']['median_ms']:.2f} ms "
            f"({row['speedup']:.2f}x), FLOPs x{row['flops_ratio']:.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = parse_config(PruneEvalConfig, args=argv, prog="craftvla prune eval")
    report = evaluate(cfg)
    print(summary(report))
    if cfg.out:
        write_json_atomic(cfg.out, report, indent=1)
        print(f"report written to {cfg.out}")
    return 0
