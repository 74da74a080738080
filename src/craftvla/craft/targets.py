"""Retention targets: what CRaFT holds close to the initial model, as pure functions of a forward.

Each target maps a policy and the VLM context of one forward to a tensor whose first axis is the
sample (`--craft.targets`, comma-separated to combine):

| target    | what                                                              | shape        |
|-----------|-------------------------------------------------------------------|--------------|
| `pooled`  | the design note's bridge features: C_R (vision states of the      | (B, F)       |
|           | anchor layer) and/or C_AQ (last-layer action queries), pooled     |              |
| `tokens`  | the same states token by token (C_R tokens, then C_AQ tokens)     | (B, N, D)    |
| `actions` | the policy's own predicted action chunk, normalised units         | (B, H, A)    |
|           | (behaviour distillation: what the head makes of those states)     |              |

The retention loss is scale-free: per target, MSE(f, f0) / s with s = `feature_variance` of the
initial model's target on anchor data (the variance across samples, averaged over every other
axis), measured once before training. A budget of 0.05 then means "the features may move by 5 %
of how much they differ between inputs", for any model width or layer. With several targets,
L_ret is the mean of their scaled losses.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from craftvla.craft.functional import retention_loss
from craftvla.errors import CraftVLAError
from craftvla.model.context import VLMContext, bridge_features

TargetFn = Callable[[nn.Module, VLMContext, object], torch.Tensor]  # (policy, context, CraftConfig) -> (B, ...)


def pooled_target(policy: nn.Module, context: VLMContext, cfg) -> torch.Tensor:
    """(B, F): pooled C_R and/or C_AQ (`bridge_features`, the configured layer/pooling/type)."""
    return bridge_features(context, policy.anchor_layer(cfg.anchor_layer_idx), pooling=cfg.online_pooling,
                           anchor_type=cfg.online_anchor_type)


def token_target(policy: nn.Module, context: VLMContext, cfg) -> torch.Tensor:
    """(B, N_vis + Q, D) or one of the two parts: the states `pooled_target` pools, unpooled.
    Vision tokens masked out in the layout (soft pruning) are zeroed, on both sides alike."""
    layer, kind = policy.anchor_layer(cfg.anchor_layer_idx), cfg.online_anchor_type
    parts = []
    if kind in ("both", "vision"):
        vision, mask = context.vision(layer), context.vision_mask(layer)  # (B, N, D), (B, N) | None
        parts.append(vision if mask is None else vision * mask.unsqueeze(-1).to(vision.dtype))
    if kind in ("both", "action_query"):
        parts.append(context.queries(-1))  # (B, Q, D)
    return torch.cat(parts, dim=1)


def action_target(policy: nn.Module, context: VLMContext, cfg) -> torch.Tensor:
    """(B, H, A): the action head's chunk for this context, in normalised units (`target_actions`:
    differentiable; a discrete head's expected action). A stochastic head (flow matching) draws its
    noise from a generator seeded the same way on every call, so the start's and the current
    policy's chunks differ only by what the weights do."""
    generator = torch.Generator(device=context.state.device).manual_seed(0)
    return policy.action_head.target_actions(context, generator=generator)


TARGETS: dict[str, TargetFn] = {"pooled": pooled_target, "tokens": token_target, "actions": action_target}


def compute_targets(policy: nn.Module, context: VLMContext, cfg) -> dict[str, torch.Tensor]:
    """Every configured target of one forward: {name: (B, ...)}."""
    return {name: TARGETS[name](policy, context, cfg) for name in cfg.target_names}


def feature_variance(f: torch.Tensor) -> torch.Tensor:
    """The spread a scale-free loss divides by: variance across samples (axis 0, population
    formula), averaged over all other axes. (B, ...) -> () float32."""
    if f.shape[0] < 2:
        raise CraftVLAError(f"feature variance needs at least 2 samples, got a batch of {f.shape[0]}")
    return f.float().var(dim=0, unbiased=False).mean()


def combined_retention_loss(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], scales: dict[str, torch.Tensor]
                            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_ret = the mean over targets of MSE / scale, and each target's term (for the log)."""
    terms = {name: retention_loss(f, f0, scales[name]) for name, (f, f0) in pairs.items()}
    return torch.stack(list(terms.values())).mean(), terms
