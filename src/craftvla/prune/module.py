"""`VisionTokenPruning`: the tower pooling, the merger and the layer pruner as one opt-in part of a policy.

    apply_pruning(policy, PruningConfig(merger="learned", scorer="attention"))  # adds policy.pruning
    policy.encode(batch)        # merges before the LLM, selects inside it (hard: tokens removed)
    apply_pruning(policy, PruningConfig(vision_merge_ratio=0.25))  # pools patches inside the vision towers
    policy.pruning.set_soft(True, temperature=0.5)   # training: straight-through masks instead

The config is part of the policy's config (`VLAConfig.pruning`), so a pruned checkpoint saves and
loads like any other; no module of transformers is patched (the soft masks reach attention through
an attention implementation registered with transformers' AttentionInterface).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
from torch import nn

from craftvla.config import LEARNED_MERGERS, PruningConfig
from craftvla.errors import ConfigError
from craftvla.model.language import TokenSelector
from craftvla.prune.merger import (
    LearnableTokenMerger,
    LearnableTokenMergerV2,
    PoolMerger,
    ToMeMerger,
    ToMeSetMerger,
    TowerPool,
    WindowScoreMerger,
    merged_count,
    patch_groups,
)
from craftvla.prune.pruner import LayerSpecificPruner
from craftvla.prune.scorers import (
    FastVScorer,
    InstructionScorer,
    RandomScorer,
    VisionPrunerHead,
    VisionPrunerHeadSimple,
)


class VisionTokenPruning(nn.Module):
    def __init__(self, cfg: PruningConfig, llm, vision, num_cameras: int):
        super().__init__()
        self.cfg = cfg
        dim = llm.hidden_size
        self.tower_pool = _build_tower_pool(cfg, vision, dim)
        patches = self.tower_pool.num_out if self.tower_pool is not None else vision.num_patches
        self.num_tokens = num_cameras * patches  # vision tokens from the projector
        self.merger = _build_merger(cfg, dim, num_cameras, patches)
        self.pruner = _build_pruner(cfg, llm)
        self.off: frozenset[str] = frozenset()  # parts switched off by `disabled()`
        if self.pruner is not None:
            llm.use_keep_attention()

    @contextlib.contextmanager
    def disabled(self, parts: tuple[str, ...] = ("vision", "merger", "pruner")) -> Iterator[None]:
        """Within: the given parts do nothing. By default all: the original, unpruned policy;
        ("pruner",): the merged policy without in-LLM selection (stage 2's reference)."""
        unknown = set(parts) - {"vision", "merger", "pruner"}
        if unknown:
            raise ValueError(f"disabled(): unknown parts {sorted(unknown)}; choose from vision, merger, pruner")
        self.off = frozenset(parts)
        try:
            yield
        finally:
            self.off = frozenset()

    @property
    def num_llm_tokens(self) -> int:
        """Vision tokens entering the LLM (after merging)."""
        return merged_count(self.num_tokens, self.cfg.merge_ratio) if self.merger is not None else self.num_tokens

    def set_soft(self, soft: bool, temperature: Optional[float] = None, noise: bool = True) -> None:
        """Training (soft masks, Gumbel noise while in training mode) or inference (hard removal)."""
        if self.pruner is not None:
            self.pruner.soft, self.pruner.noise = soft, noise
            if temperature is not None:
                self.pruner.temperature = float(temperature)

    def vision_pool(self) -> Optional[TowerPool]:
        """What the vision towers pool with (None: they run on every patch)."""
        return None if "vision" in self.off else self.tower_pool

    @property
    def learned_merge(self) -> Optional[nn.Module]:
        """The learned part that merges before the LLM (stage 1 trains it): the merger or the towers' pool."""
        if self.cfg.merger in LEARNED_MERGERS:
            return self.merger
        learned_towers = self.tower_pool is not None and self.cfg.vision_merger in LEARNED_MERGERS
        return self.tower_pool if learned_towers else None

    def merge(
        self, vision: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, stats: dict, spread: bool = False
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """vision (B, N', D) from the projector (N' < N when the towers pooled) -> the LLM's (B, M, D),
        and with `spread` every one of the N patch positions' stand-in (B, N, D): the merged token
        that took it (the towers' window, then the merger's sources), which is what a position-aware
        read-out of the patches sees. Records merge_sparsity (learned mergers and learned tower
        pools, whose towers have just run) and token counts."""
        pooled = self.tower_pool.sparsity if self.tower_pool is not None else []
        if pooled:
            stats["merge_sparsity"] = torch.stack(pooled).mean()
            pooled.clear()
        merged, seen = vision, vision
        if "merger" not in self.off:
            stats["tokens/input"] = torch.tensor(float(vision.shape[1]))
        if self.merger is not None and "merger" not in self.off:
            merged, sources, extra = self.merger(vision, text, text_mask)
            stats.update(extra)
            stats["tokens/merged"] = torch.tensor(float(merged.shape[1]))
            seen = sources.to(merged.dtype) @ merged if spread else None  # (B, N', D)
        if spread and self.vision_pool() is not None:
            seen = self._unpool(seen)
        return merged, seen if spread else None

    def _unpool(self, seen: torch.Tensor) -> torch.Tensor:
        """(B, n_img * M, D) -> (B, n_img * N, D): every patch reads the token its tower merged it into."""
        sources = self.tower_pool.sources  # (1 or n_img * B, N, M), cameras stacked on the batch axis
        images = self.num_tokens // self.tower_pool.num_out
        sources = sources.expand(images * seen.shape[0], -1, -1).unflatten(0, (images, -1))  # (n, B, N, M)
        per_image = seen.unflatten(1, (images, -1)).transpose(0, 1)  # (n, B, M, D)
        return (sources.to(seen.dtype) @ per_image).transpose(0, 1).flatten(1, 2)

    def selector(self, num_input: int, stats: dict) -> Optional[TokenSelector]:
        return None if self.pruner is None or "pruner" in self.off else self.pruner.selector(num_input, stats)


def _build_tower_pool(cfg: PruningConfig, vision, text_dim: int) -> Optional[TowerPool]:
    if cfg.vision_merge_ratio == 1.0:
        return None
    from craftvla.model.vision import ViTTower

    if not all(isinstance(tower, ViTTower) for tower in vision.towers):
        raise ConfigError("pruning.vision_merge_ratio pools patches inside ViT towers; this backbone has a CNN")
    grid = math.isqrt(vision.num_patches)
    if grid * grid != vision.num_patches:
        raise ConfigError(
            f"pruning.vision_merge_ratio groups a square patch grid; the towers give {vision.num_patches}"
        )
    dims = [tower.embed_dim for tower in vision.towers]
    return TowerPool(
        grid, cfg.vision_merge_ratio, cfg.vision_merge_depth, cfg.vision_merger, dims, text_dim, cfg.hidden_dim
    )


def _build_merger(cfg: PruningConfig, dim: int, num_cameras: int, patches: int) -> Optional[nn.Module]:
    if cfg.merger == "none":
        return None
    if cfg.merger in ("tome", "learned_tome"):
        num_out = merged_count(num_cameras * patches, cfg.merge_ratio)
        return ToMeMerger(num_out) if cfg.merger == "tome" else ToMeSetMerger(dim, num_out, cfg.hidden_dim)
    grid = math.isqrt(patches)
    if grid * grid != patches:
        raise ConfigError(
            f"pruning.merger={cfg.merger!r} groups a square patch grid; this vision tower gives {patches}"
        )
    groups = patch_groups(num_cameras, grid, cfg.merge_ratio)
    if cfg.merger == "pool":
        return PoolMerger(groups)
    if cfg.merger == "learned_window":
        return WindowScoreMerger(dim, groups, cfg.hidden_dim)
    cls = LearnableTokenMerger if cfg.merger == "learned" else LearnableTokenMergerV2
    return cls(dim, groups, cfg.hidden_dim)


def _build_pruner(cfg: PruningConfig, llm) -> Optional[LayerSpecificPruner]:
    schedule = cfg.schedule(llm.num_layers)
    if not schedule:
        return None
    dim = llm.hidden_size
    if cfg.scorer == "attention":
        return LayerSpecificPruner(
            schedule, heads={layer: VisionPrunerHead(dim, cfg.hidden_dim) for layer, _ in schedule}
        )
    if cfg.scorer == "mlp":
        return LayerSpecificPruner(
            schedule, heads={layer: VisionPrunerHeadSimple(dim, cfg.hidden_dim) for layer, _ in schedule}
        )
    scorer = {"random": RandomScorer, "fastv": lambda: FastVScorer(llm), "instruction": lambda: InstructionScorer(llm)}
    return LayerSpecificPruner(schedule, scorer=scorer[cfg.scorer]())


def build_pruning(policy) -> Optional[VisionTokenPruning]:
    """The policy's pruning part from `policy.config.pruning`, or None when it is off."""
    cfg = policy.config.pruning
    if not cfg.enabled:
        return None
    return VisionTokenPruning(cfg, policy.llm, policy.vision, len(policy.config.camera_keys))


def apply_pruning(policy, cfg: PruningConfig):
    """Give `policy` vision-token pruning (replacing any it had); returns the policy.

    New learned parts are randomly initialised (train them with `craftvla prune train`); a merger
    or pruner the policy already had keeps its weights when its settings are unchanged; the rest
    of the policy is unchanged. The config is recorded in `policy.config.pruning`."""
    old, old_cfg = getattr(policy, "pruning", None), policy.config.pruning
    policy.config.pruning = cfg
    policy.pruning = build_pruning(policy)
    if policy.pruning is not None and old is not None:  # parts whose settings are unchanged keep their weights
        if old.merger is not None and _same(old_cfg, cfg, "merger", "merge_ratio", "hidden_dim"):
            policy.pruning.merger = old.merger
        towers = ("vision_merge_ratio", "vision_merge_depth", "vision_merger", "hidden_dim")
        if old.tower_pool is not None and _same(old_cfg, cfg, *towers):
            policy.pruning.tower_pool = old.tower_pool
        if old.pruner is not None and _same(old_cfg, cfg, "scorer", "layers", "keep", "hidden_dim"):
            policy.pruning.pruner = old.pruner
    if policy.pruning is not None:
        policy.pruning.to(policy.action_queries.weight.device)
    return policy


def _same(a: PruningConfig, b: PruningConfig, *fields: str) -> bool:
    return all(getattr(a, f) == getattr(b, f) for f in fields)
