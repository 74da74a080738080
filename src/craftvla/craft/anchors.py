"""Anchor-feature providers: what the bridge features of the *initial* model are.

Each provider answers `retention_pair(policy, batch, context) -> (f_theta (B, F), f_anchor (B, F))`,
with `f_theta` carrying gradient and `f_anchor` not:

- `OnlineAnchors` (default): the same batch through the initial weights, without moving any
  weight. Under LoRA the adapters are bypassed (no extra memory) and the other trainable tensors
  that feed the features (the action queries, a trainable projector...) take their initial
  values through `torch.func.functional_call` from device-resident copies; without LoRA the
  same functional call covers every trainable tensor that feeds the features. The copies kept
  are only those the feature graph actually reaches (found once, from the first step's graph).
  Exact: equal to a frozen copy of the initial model.
- `craft.cache.CacheAnchorProvider`: targets from an offline anchor cache (craft/cache.py), on anchor
  batches drawn from the cache alongside the task data.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch
from torch import nn

from craftvla.craft.config import CraftConfig
from craftvla.model.context import VLMContext

log = logging.getLogger(__name__)
FeatureFn = Callable[[VLMContext], torch.Tensor]  # a policy's VLM context -> (B, F)


class _EncodeCall(nn.Module):
    """`policy.encode` as a module forward, so `functional_call` can re-parametrise `policy.*`."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, batch: dict):
        return self.policy.encode(batch)


def _lora_context(policy: nn.Module):
    """Adapters bypassed if the policy has PEFT LoRA layers, else a no-op context."""
    from craftvla.train.peft import has_lora, lora_disabled

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
    """Exact anchors from the initial weights on the same batch; nothing moves between devices."""

    def __init__(self, policy: nn.Module, feature_fn: FeatureFn):
        from craftvla.train.peft import is_lora_param

        self.feature_fn = feature_fn
        self.lora = _lora_context(policy)[1]
        self.initial = {n: p.detach().clone() for n, p in policy.named_parameters()
                        if p.requires_grad and not (self.lora and is_lora_param(n))}
        self.initial_buffers = _running_stat_buffers(policy)
        self._ids = {id(p): n for n, p in policy.named_parameters()}
        self._pruned = False
        self._call = _EncodeCall(policy)
        self.description = self._describe()
        log.info("CRaFT online anchors: %s", self.description)

    def _describe(self) -> str:
        numel = sum(t.numel() for t in self.initial.values())
        how = "LoRA adapters disabled" if self.lora else "no adapters"
        if not self.initial and not self.lora:
            return "no trainable tensor feeds the bridge features: anchors = current features (no extra forward)"
        return f"{how} + functional_call with {len(self.initial)} initial tensors ({numel:,} values) kept on the device"

    @torch.no_grad()
    def features(self, policy: nn.Module, batch: dict) -> torch.Tensor:
        """(B, F) bridge features of the initial model on `batch`."""
        overrides = {f"policy.{n}": t for n, t in self.initial.items()}
        overrides.update({f"policy.{n}": t.clone() for n, t in self.initial_buffers.items()})
        adapters_off, _ = _lora_context(policy)
        with adapters_off:
            context = torch.func.functional_call(self._call, overrides, (batch,))
        return self.feature_fn(context)

    def _prune(self, f_theta: torch.Tensor) -> None:
        """Keep only the initial copies of tensors the feature graph reaches (frees the rest)."""
        reached = {self._ids[i] for i in reachable_parameters(f_theta) if i in self._ids}
        dropped = [n for n in self.initial if n not in reached]
        for name in dropped:
            del self.initial[name]
        self._pruned = True
        self.description = self._describe()
        log.info("CRaFT online anchors: dropped %d initial copies the features never read; %s",
                 len(dropped), self.description)

    def retention_pair(self, policy: nn.Module, batch: dict, context: VLMContext) -> tuple[torch.Tensor, torch.Tensor]:
        f_theta = self.feature_fn(context)  # (B, F), with gradient
        if not self._pruned:
            self._prune(f_theta)
        if not self.initial and not self.lora:
            return f_theta, f_theta.detach()
        return f_theta, self.features(policy, batch)


def make_anchor_provider(policy: nn.Module, cfg: CraftConfig, feature_fn: FeatureFn, seed: int = 0):
    """The provider named by `cfg.source` (`seed` orders the cache's anchor batches)."""
    if cfg.source == "online":
        return OnlineAnchors(policy, feature_fn)
    from craftvla.craft.cache import CacheAnchorProvider

    return CacheAnchorProvider(policy, feature_fn, cfg, batch_size=cfg.anchor_batch_size, seed=seed)
