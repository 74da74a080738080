"""CRaFT configuration: the `--craft.*` flags of `craftvla train`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from craftvla.craft.functional import PROJECTION_SCOPES
from craftvla.craft.targets import TARGETS
from craftvla.errors import require
from craftvla.model.context import ANCHOR_TYPES, POOLING_MODES

ANCHOR_SOURCES = ("online", "memo", "cache")
# craft: projection + dual ascent (the method). The other three are the retention-study
# baselines run by the same plug-in: l2_init = L2-SP penalty (retention_weight/2)*||theta-theta0||^2;
# distill_fixed = feature distillation with a fixed weight (no projection, no dual update);
# dual_only = feature distillation with the dual update but no projection.
MODES = ("craft", "l2_init", "distill_fixed", "dual_only")
# The fast actions configuration's defaults (issue 33; benchmarks/craft_step/actions.md: 1.13x a plain
# step at batch 32, against 1.57x for the exact version; benchmarks/retention: the same retention):
MEMO_FRAMES = 1024  # anchor frames whose teacher chunks a memo run keeps (the action cache's 1,024)
FAST_EVERY = 2  # the retention gradient every 2 steps, with an anchor batch of 8 (the flag default)


@dataclass
class CraftConfig:
    # Turn the CRaFT plug-in on; off = plain fine-tuning.
    enabled: bool = False
    # "craft" (the method) or a baseline: "l2_init", "distill_fixed", "dual_only" (see MODES).
    mode: str = "craft"
    # Initial lambda, the weight of g_ret (for l2_init: the L2-SP coefficient alpha).
    retention_weight: float = 1.0
    # epsilon: the retention budget; lambda grows while L_ret exceeds it and shrinks below it. With
    # scale_free (default) L_ret is a fraction of the targets' spread across anchor samples.
    retention_budget: float = 0.1
    # eta_lambda: step size of the dual update lambda <- max(0, lambda + eta * (L_ret - epsilon)).
    dual_lr: float = 0.01
    # Measure the violation in units of the budget: lambda <- max(0, lambda + eta * (L_ret / epsilon - 1))
    # (the constraint L_ret / epsilon <= 1), so one dual step serves a budget of 0.01 and of 1 alike.
    dual_relative: bool = False
    # delta in the projection denominator ||g_ret||^2 + delta (guards a vanishing g_ret).
    projection_eps: float = 1e-8
    # Project g_act off g_ret when they conflict (only read in mode "craft"; baselines never project).
    enable_projection: bool = True
    # "global": one projection over the whole trainable-parameter vector (the formula's meaning);
    # "per_tensor": one per parameter tensor.
    projection_scope: str = "global"
    # LLM layer whose vision-patch states give C_R (hidden_states index, 0 = embeddings);
    # None = the policy's default anchor layer, num_layers // 2, or, with an anchor
    # cache, the layer the cache was built at.
    anchor_layer_idx: Optional[int] = None
    # Which bridge features are kept: "both" (C_R and C_AQ), "vision" (C_R
    # only) or "action_query" (C_AQ only). Keep "both" when the starting checkpoint trained its
    # action queries (a VLA checkpoint); use "vision" when it did not (a plain VLM start, where
    # the queries are zero-initialised and their "initial features" carry no knowledge to keep).
    # None = "both", or, with an anchor cache, the cache's token set (its anchor_type).
    anchor_type: Optional[str] = None
    # Token pooling for the bridge features: "mean" or "max"; None = "mean", or, with an anchor
    # cache, the cache's pooling.
    pooling: Optional[str] = None
    # Where the initial model's targets come from: "online" (the initial weights on every anchor
    # batch: adapters disabled / functional_call; exact), "memo" (the same, but computed once per
    # anchor frame, when training first meets it, and kept in memory: no teacher forward for a frame
    # met before; needs anchor_dataset) or "cache" (an offline anchor cache, see anchor_cache).
    # None = "cache" when anchor_cache is given, "memo" for the actions target alone on an
    # anchor_dataset (unless the head samples with noise: then "online"), else "online".
    anchor_source: Optional[str] = None
    # Anchor-cache directory (built by `craftvla cache build`); implies anchor_source="cache".
    anchor_cache: Optional[str] = None
    # Anchor samples per micro-batch drawn from the cache or from anchor_dataset.
    anchor_batch_size: int = 8
    # A LeRobot dataset whose batches the online anchors use (e.g. the old tasks' data), instead of
    # the training batch; several, comma-separated, are concatenated (frames drawn uniformly from all:
    # the start policy's tasks and earlier continual stages). Costs one more forward + backward of
    # anchor_batch_size samples per micro-batch.
    anchor_dataset: Optional[str] = None
    # Draw anchors from a fixed, seeded subset of this many frames of anchor_dataset (0, or more than
    # it has = all of it). With anchor_source "memo" it bounds the teacher's work to this many frames
    # for the whole run. None = MEMO_FRAMES with memo, else all.
    anchor_frames: Optional[int] = None
    # Recompute the retention gradient (anchor forward + backward) every this many optimizer steps;
    # the steps between reuse the last g_ret and L_ret for the projection, lambda's term and the dual
    # update. 1 = every step (exact). None = FAST_EVERY for the actions target alone on an
    # anchor_dataset (benchmarks/craft_step/actions.md, benchmarks/retention), else 1.
    retention_every: Optional[int] = None
    # What is retained, comma-separated to combine: pooled (bridge features, the design note's),
    # tokens (the same states per token), actions (the policy's own action chunks: behaviour
    # distillation); see craft/targets.py. None = actions with an anchor_dataset (the retention
    # study's finding: the only target that kept the old tasks), pooled without one, or with an
    # anchor cache what it holds.
    targets: Optional[str] = None
    # Divide each target's MSE by its variance across anchor samples (measured once before
    # training), so the budget is a fraction of the features' spread; false = raw MSE.
    scale_free: bool = True
    # Anchor samples the variance is measured on.
    scale_samples: int = 256
    # Log craft/* metrics every this many optimizer steps (averaged over those steps);
    # None = the run's logging frequency (--log.log_freq).
    log_freq: Optional[int] = None

    def __post_init__(self) -> None:
        self._check_method()
        self._check_targets()
        self._check_anchor_source()
        self._check_anchor_data()

    def _check_method(self) -> None:
        """The mode, the loss and the surgery's numbers."""
        require(self.mode in MODES, "craft.mode", self.mode, f"choose one of {MODES}")
        require(self.retention_weight >= 0, "craft.retention_weight", self.retention_weight, "must be >= 0")
        require(self.retention_budget >= 0, "craft.retention_budget", self.retention_budget, "must be >= 0")
        require(self.dual_lr >= 0, "craft.dual_lr", self.dual_lr, "must be >= 0")
        require(
            not self.dual_relative or self.retention_budget > 0,
            "craft.dual_relative",
            self.dual_relative,
            f"measures L_ret in units of craft.retention_budget={self.retention_budget}: the budget must be > 0",
        )
        require(self.projection_eps >= 0, "craft.projection_eps", self.projection_eps, "must be >= 0")
        require(
            self.projection_scope in PROJECTION_SCOPES,
            "craft.projection_scope",
            self.projection_scope,
            f"choose one of {PROJECTION_SCOPES}",
        )
        require(self.scale_samples >= 2, "craft.scale_samples", self.scale_samples, "must be >= 2")
        require(self.log_freq is None or self.log_freq >= 1, "craft.log_freq", self.log_freq, "must be >= 1")

    def _check_targets(self) -> None:
        """What is retained and where it is read."""
        unknown = [t for t in self.target_names if t not in TARGETS]
        require(
            not unknown and len(set(self.target_names)) == len(self.target_names),
            "craft.targets",
            self.targets,
            f"choose one or more of {tuple(TARGETS)}, comma-separated, each once",
        )
        require(
            self.anchor_layer_idx is None or self.anchor_layer_idx >= 0,
            "craft.anchor_layer_idx",
            self.anchor_layer_idx,
            "must be >= 0 (a hidden_states index) or null for the middle layer",
        )
        require(
            self.anchor_type is None or self.anchor_type in ANCHOR_TYPES,
            "craft.anchor_type",
            self.anchor_type,
            f"choose one of {ANCHOR_TYPES}",
        )
        require(
            self.pooling is None or self.pooling in POOLING_MODES,
            "craft.pooling",
            self.pooling,
            f"choose one of {POOLING_MODES}",
        )

    def _check_anchor_source(self) -> None:
        """Online, memo or cache, and the flags each one needs or refuses."""
        require(
            self.anchor_source is None or self.anchor_source in ANCHOR_SOURCES,
            "craft.anchor_source",
            self.anchor_source,
            f"choose one of {ANCHOR_SOURCES}",
        )
        require(
            self.source != "cache" or self.anchor_cache,
            "craft.anchor_cache",
            self.anchor_cache,
            "craft.anchor_source='cache' needs the cache directory",
        )
        require(
            self.source == "cache" or not self.anchor_cache,
            "craft.anchor_source",
            self.anchor_source,
            f"conflicts with craft.anchor_cache={self.anchor_cache!r} (drop one of the two flags)",
        )

    def _check_anchor_data(self) -> None:
        """The anchor batches: their size, dataset, frame set and how often they are used."""
        require(self.anchor_batch_size >= 1, "craft.anchor_batch_size", self.anchor_batch_size, "must be >= 1")
        require(
            not (self.anchor_dataset and self.source == "cache"),
            "craft.anchor_dataset",
            self.anchor_dataset,
            "is for online anchors; a cache already holds its anchor data (drop one of the two)",
        )
        require(
            self.source != "memo" or self.anchor_dataset,
            "craft.anchor_source",
            self.anchor_source,
            "'memo' keeps the targets of anchor_dataset's frames; give --craft.anchor_dataset DIR",
        )
        require(
            self.anchor_frames in (None, 0) or self.anchor_frames >= 2,
            "craft.anchor_frames",
            self.anchor_frames,
            "must be >= 2 (or 0: the whole anchor dataset)",
        )
        require(
            not self.anchor_frames or self.anchor_dataset,
            "craft.anchor_frames",
            self.anchor_frames,
            "picks frames of --craft.anchor_dataset; give that too",
        )
        require(
            self.retention_every is None or self.retention_every >= 1,
            "craft.retention_every",
            self.retention_every,
            "must be >= 1",
        )

    # Unset fields stay None (so a saved config keeps meaning "the default"); these resolve them.
    @property
    def source(self) -> str:
        """anchor_source, or "cache" when only anchor_cache is given, "memo" for the fast actions
        configuration (`fast_actions`), else "online"."""
        if self.anchor_source:
            return self.anchor_source
        return "cache" if self.anchor_cache else "memo" if self.fast_actions else "online"

    @property
    def fast_actions(self) -> bool:
        """The configuration issue 33 made cheap (and measured): CRaFT with the actions target alone on an
        anchor dataset's frames, the initial model as teacher (online or memo)."""
        return (
            self.mode == "craft"
            and bool(self.anchor_dataset)
            and self.target_names == ["actions"]
            and self.anchor_source in (None, "online", "memo")
        )

    @property
    def frames(self) -> Optional[int]:
        """anchor_frames resolved: a frame count, or None for every frame of the anchor dataset."""
        if self.anchor_frames is None:
            return MEMO_FRAMES if self.source == "memo" else None
        return self.anchor_frames or None

    @property
    def every(self) -> int:
        """retention_every resolved: FAST_EVERY for the fast actions configuration, else 1."""
        if self.retention_every is not None:
            return self.retention_every
        return FAST_EVERY if self.fast_actions else 1

    @property
    def target_names(self) -> list[str]:
        """The retention targets, in order (a cache run adopts the cache's when unset)."""
        default = "actions" if self.anchor_dataset else "pooled"
        return [t.strip() for t in (self.targets or default).split(",") if t.strip()]

    @property
    def online_anchor_type(self) -> str:
        """anchor_type for online anchors (a cache run adopts the cache's instead)."""
        return self.anchor_type or "both"

    @property
    def online_pooling(self) -> str:
        """pooling for online anchors (a cache run adopts the cache's instead)."""
        return self.pooling or "mean"

    @property
    def projection_on(self) -> bool:
        """Gradient projection is part of the method only; the baselines never project."""
        return self.mode == "craft" and self.enable_projection

    @property
    def dual_on(self) -> bool:
        """The dual update runs for the method and the dual-only baseline."""
        return self.mode in ("craft", "dual_only")

    @property
    def uses_features(self) -> bool:
        """Every mode but L2-SP needs bridge features and anchors."""
        return self.mode != "l2_init"
