"""Anchor providers: the retention targets of the *initial* model, next to the current model's.

Each provider answers `retention_pairs(policy, batch, context) -> {target: (f_theta, f_anchor)}`
(targets as in craft/targets.py, first axis the sample), `f_theta` carrying gradient, `f_anchor`
not, and `measure_targets(policy, batches) -> {target: (N, ...)}`, the initial model's targets the
loss scale is measured on:

- `OnlineAnchors` (default): the initial weights, without moving any weight, on the training
  batch (free: its forward is already done) or on batches of a separate anchor dataset
  (`--craft.anchor_dataset`: one more forward per micro-batch). With `--craft.anchor_source memo`
  the initial model's targets are kept per anchor frame (keyed by the frame's dataset index, and its source with several anchor datasets), so
  a frame met before costs no teacher forward: only the frames of a batch not yet met are run. Under LoRA the adapters are
  bypassed (no extra memory) and the other trainable tensors that feed the targets (the action
  queries, the action head for the `actions` target...) take their initial values through
  `torch.func.functional_call` from device-resident copies; without LoRA the same functional call
  covers every trainable tensor that feeds the targets. The copies kept are only those the target
  graph actually reaches (found once, from the first step's graph). Exact: equal to a frozen copy
  of the initial model.
- `CacheAnchors`: the teacher's targets stored in an offline anchor cache (craft/cache.py), on
  anchor batches drawn from the cache alongside the task data. The cache fixes what is retained:
  each `--craft.*` extraction flag left unset adopts the cache's value, one that is set must match.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Optional

import torch
from torch import nn

from craftvla.craft.cache import AnchorCache, model_fingerprint, target_key
from craftvla.craft.config import CraftConfig
from craftvla.craft.data import BatchStream
from craftvla.craft.targets import Extraction, absolute_layer
from craftvla.data.loading import select_rows, to_device
from craftvla.errors import ConfigError, CraftVLAError
from craftvla.keys import SOURCE_KEY
from craftvla.model.context import VLMContext
from craftvla.model.peft import has_lora, is_lora_param, lora_disabled

log = logging.getLogger(__name__)
FeatureFn = Callable[[VLMContext], dict[str, torch.Tensor]]  # a VLM context -> {target: (B, ...)}


class _TargetCall(nn.Module):
    """Encode + targets as one module forward, so `functional_call` re-parametrises every
    `policy.*` tensor the targets read, the action head's too."""

    def __init__(self, policy: nn.Module, feature_fn: FeatureFn):
        super().__init__()
        self.policy, self.feature_fn = policy, feature_fn

    def forward(self, batch: dict):
        return self.feature_fn(self.policy.encode(batch))


def _lora_context(policy: nn.Module):
    """Adapters bypassed if the policy has PEFT LoRA layers, else a no-op context."""
    return (lora_disabled(policy), True) if has_lora(policy) else (contextlib.nullcontext(), False)


def reachable_parameters(root: torch.Tensor) -> set[int]:
    """ids of the leaf tensors (parameters) that `root`'s autograd graph reaches."""
    seen, found, stack = set(), set(), [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # AccumulateGrad: a leaf
            found.add(id(node.variable))
        stack.extend(fn for fn, _ in node.next_functions)
    return found


def _running_stat_buffers(policy: nn.Module) -> dict[str, torch.Tensor]:
    """Initial BatchNorm running statistics (they drift in train mode; a frozen copy's would not)."""
    out = {}
    for mod_name, mod in policy.named_modules():
        if isinstance(mod, nn.modules.batchnorm._NormBase) and mod.track_running_stats:
            for buf_name, buf in mod.named_buffers(recurse=False):
                out[f"{mod_name}.{buf_name}" if mod_name else buf_name] = buf.detach().clone()
    return out


class OnlineAnchors:
    """Exact anchors from the initial weights; nothing moves between devices. `anchor_batches`
    (optional) gives the anchor dataset's micro-batches; without it the training batch is used."""

    def __init__(
        self,
        policy: nn.Module,
        feature_fn: FeatureFn,
        anchor_batches: Optional[BatchStream] = None,
        memo: bool = False,
    ):
        self.feature_fn = feature_fn
        self.memo: Optional[dict[int, dict[str, torch.Tensor]]] = {} if memo else None  # frame -> {target: row}
        self._raw: Optional[dict] = None  # the current anchor batch as drawn (CPU), for the memo
        self.lora = _lora_context(policy)[1]
        self.initial = {
            n: p.detach().clone()
            for n, p in policy.named_parameters()
            if p.requires_grad and not (self.lora and is_lora_param(n))
        }
        self.initial_buffers = _running_stat_buffers(policy)
        self._ids = {id(p): n for n, p in policy.named_parameters()}
        self._pruned = False
        self._call = _TargetCall(policy, feature_fn)
        self._make_stream, self._stream = anchor_batches, None
        self.description = self._describe()
        log.info("CRaFT online anchors: %s", self.description)

    def _describe(self) -> str:
        numel = sum(t.numel() for t in self.initial.values())
        how = "LoRA adapters disabled" if self.lora else "no adapters"
        data = "anchor-dataset batches" if self._make_stream else "the training batch"
        if self.memo is not None:
            data += ", the initial targets kept per frame once computed (memo)"
        if not self.initial and not self.lora:
            return f"on {data}; no trainable tensor feeds the targets: anchors = current targets (no extra forward)"
        return f"on {data}; {how} + functional_call with {len(self.initial)} initial tensors ({numel:,} values) on the device"

    def start(self, step: int) -> None:
        """Position the anchor-batch stream at optimizer step `step` (0, or a resumed step)."""
        if self._make_stream is not None:
            self._stream = self._make_stream(step)

    @torch.no_grad()
    def features(self, policy: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """{target: (B, ...)} of the initial model on `batch`."""
        overrides = {f"policy.{n}": t for n, t in self.initial.items()}
        overrides.update({f"policy.{n}": t.clone() for n, t in self.initial_buffers.items()})
        adapters_off, _ = _lora_context(policy)
        with adapters_off:
            return torch.func.functional_call(self._call, overrides, (batch,))

    def _prune(self, targets: dict[str, torch.Tensor]) -> None:
        """Keep only the initial copies of tensors the target graph reaches (frees the rest)."""
        reached = set()
        for f in targets.values():
            reached |= {self._ids[i] for i in reachable_parameters(f) if i in self._ids}
        dropped = [n for n in self.initial if n not in reached]
        for name in dropped:
            del self.initial[name]
        self._pruned = True
        self.description = self._describe()
        log.info(
            "CRaFT online anchors: dropped %d initial copies the targets never read; %s", len(dropped), self.description
        )

    def anchor_batch(self, policy: nn.Module, batch: dict, context: VLMContext) -> tuple[dict, VLMContext]:
        """The batch the targets are computed on, and the current model's context for it."""
        if self._make_stream is None:
            return batch, context
        if self._stream is None:
            self.start(0)
        raw = next(self._stream)
        if self.memo is not None and "index" not in raw:
            raise CraftVLAError("craft.anchor_source=memo: the anchor batches carry no frame `index` to key on")
        self._raw = raw
        anchor = to_device(raw, policy.action_queries.weight.device)
        return anchor, policy.encode(anchor)

    def memo_targets(self, policy: nn.Module, raw: dict) -> dict[str, torch.Tensor]:
        """{target: (B, ...)} of the initial model on `raw` (a collated CPU anchor batch with frame
        `index`es), from the memo; the frames not met before are run (as one sub-batch) and kept."""
        keys = raw["index"].tolist()
        if SOURCE_KEY in raw:  # several anchor datasets: frame indices repeat across them
            keys = list(zip(raw[SOURCE_KEY].tolist(), keys))
        missing = sorted({k: r for r, k in enumerate(keys) if k not in self.memo}.items())
        if missing:
            sub = select_rows(raw, [r for _, r in missing])
            computed = self.features(policy, to_device(sub, policy.action_queries.weight.device))
            for j, (key, _) in enumerate(missing):
                self.memo[key] = {name: f[j].clone() for name, f in computed.items()}
        rows = [self.memo[k] for k in keys]
        return {name: torch.stack([row[name] for row in rows]) for name in rows[0]}

    def retention_pairs(
        self, policy: nn.Module, batch: dict, context: VLMContext
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        batch, context = self.anchor_batch(policy, batch, context)
        f_theta = self.feature_fn(context)  # {target: (B, ...)}, with gradient
        if not self._pruned:
            self._prune(f_theta)
        if not self.initial and not self.lora:
            return {k: (f, f.detach()) for k, f in f_theta.items()}
        memo = self.memo is not None and self._raw is not None
        f_anchor = self.memo_targets(policy, self._raw) if memo else self.features(policy, batch)
        return {k: (f, f_anchor[k]) for k, f in f_theta.items()}

    @torch.no_grad()
    def measure_targets(self, policy: nn.Module, batches) -> dict[str, torch.Tensor]:
        """{target: (N, ...)}: the initial model's targets over `batches` (for the loss scale)."""
        parts: dict[str, list[torch.Tensor]] = {}
        device = policy.action_queries.weight.device
        for batch in batches:
            for name, f in self.features(policy, to_device(batch, device)).items():
                parts.setdefault(name, []).append(f.float())
        return {name: torch.cat(fs) for name, fs in parts.items()}


def cache_extraction(policy: nn.Module, cfg: CraftConfig, cached: Extraction) -> tuple[Extraction, dict]:
    """What CRaFT's config makes the student extract against a cache holding `cached`, and what it
    adopted from the cache: each of targets / anchor_layer_idx / anchor_type / pooling left unset
    takes the cache's value; one that is set must match (`AnchorCache.check` refuses it otherwise).
    A set anchor_layer_idx matches a tokens cache of several layers on its first one."""
    adopted: dict = {}
    target = cached.target if cfg.targets is None else ",".join(cfg.target_names)
    if cfg.targets is None:
        adopted["targets"] = target
    if cached.target != "actions":
        layers = cached.layers
        if cfg.anchor_layer_idx is None:
            adopted["anchor_layer_idx"] = cached.layers[0]
        else:
            layer = absolute_layer(policy.anchor_layer(cfg.anchor_layer_idx), policy.llm.num_layers)
            layers = cached.layers if layer == cached.layers[0] else (layer,)
        for name in ("anchor_type", "pooling"):
            if getattr(cfg, name) is None and getattr(cached, name) is not None:
                adopted[name] = getattr(cached, name)
        anchor_type, pooling = cfg.anchor_type or cached.anchor_type, cfg.pooling or cached.pooling
        return Extraction(target, layers, anchor_type, pooling if cached.target == "pooled" else None), adopted
    return Extraction(target), adopted


def open_checked_cache(path, policy: nn.Module, cfg: CraftConfig) -> AnchorCache:
    """The cache at `path`, refused unless the student extracts what it holds from the same
    initial model; logs what was adopted from it."""
    cache = AnchorCache(path)
    student, adopted = cache_extraction(policy, cfg, cache.extraction)
    cache.check(student, policy.llm.hidden_size, model_fingerprint(policy))
    if adopted:
        log.info(
            "CRaFT: adopted from anchor cache %s (flags left unset): %s",
            cache.path,
            ", ".join(f"craft.{k}={v}" for k, v in adopted.items()),
        )
    return cache


class CacheAnchors:
    """Targets from an anchor cache: each call draws one anchor batch from the cache, runs the
    student on the cache's own inputs (with gradient) and returns {target: (student, cached)}
    (tokens: padded tokens are zero on both sides)."""

    def __init__(self, policy: nn.Module, cfg: CraftConfig, batch_size: int = 8, seed: int = 0):
        self.cache = open_checked_cache(cfg.anchor_cache, policy, cfg)
        self.target = self.cache.target
        self.scale_samples = cfg.scale_samples
        self.device = policy.action_queries.weight.device
        self.stream = self.cache.batches(batch_size, seed=seed, device=self.device)
        self.description = f"offline {self.target} cache {self.cache.path} ({len(self.cache)} samples)"

    def retention_pairs(self, policy, batch: dict, context: VLMContext) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        anchor = next(self.stream)
        target = anchor.pop(target_key(self.target))
        student, _ = self.cache.extraction(policy, policy.encode(anchor), self.cache.meta["max_text_tokens"])
        return {self.target: (student, target.to(student.dtype))}

    def measure_targets(self, policy, batches=None) -> dict[str, torch.Tensor]:
        """{target: (N, ...)}: the cached (teacher's) targets of the first `craft.scale_samples`
        samples; `batches` is not read: the cache is the anchor data."""
        count = min(self.scale_samples, len(self.cache))
        return {self.target: self.cache.samples(list(range(count)))[target_key(self.target)].float()}


def make_anchor_provider(
    policy: nn.Module,
    cfg: CraftConfig,
    feature_fn: FeatureFn,
    seed: int = 0,
    anchor_batches: Optional[BatchStream] = None,
):
    """The provider named by `cfg.source` (`seed` orders the cache's anchor batches)."""
    if cfg.source in ("online", "memo"):
        memo = cfg.source == "memo"
        if memo and "actions" in cfg.target_names and policy.config.head.type == "flow_matching":
            if cfg.anchor_source == "memo":
                raise ConfigError(
                    "craft.anchor_source=memo: a flow-matching head's chunk depends on the noise drawn for its "
                    "place in the batch, so a frame's target cannot be kept; use craft.anchor_source=online"
                )
            memo = False  # the default: online for a head that samples with noise
        return OnlineAnchors(policy, feature_fn, anchor_batches, memo=memo)
    return CacheAnchors(policy, cfg, batch_size=cfg.anchor_batch_size, seed=seed)
