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

An anchor cache (craft/cache.py) stores one of the same three targets per sample, extracted by
`Extraction` below at a length that does not depend on the batch (text padded to
`llm.max_text_tokens`), so the teacher that builds it and the student that reads it compute the
target with one function. Its token sets are CRaFT's `vision` plus three only a cache offers:
`text` (the instruction), `all` (every real token), `last` (the last real token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from craftvla.craft.functional import retention_loss
from craftvla.errors import ConfigError, CraftVLAError
from craftvla.model.context import VLMContext, bridge_features, pool_tokens

TargetFn = Callable[[nn.Module, VLMContext, object], torch.Tensor]  # (policy, context, CraftConfig) -> (B, ...)


def pooled_target(policy: nn.Module, context: VLMContext, cfg) -> torch.Tensor:
    """(B, F): pooled C_R and/or C_AQ (`bridge_features`, the configured layer/pooling/type)."""
    return bridge_features(
        context,
        policy.anchor_layer(cfg.anchor_layer_idx),
        pooling=cfg.online_pooling,
        anchor_type=cfg.online_anchor_type,
    )


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


def combined_retention_loss(
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], scales: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_ret = the mean over targets of MSE / scale, and each target's term (for the log)."""
    terms = {name: retention_loss(f, f0, scales[name]) for name, (f, f0) in pairs.items()}
    return torch.stack(list(terms.values())).mean(), terms


# ----- fixed-length extraction: what an anchor cache stores ---------------------------------------

CACHE_TOKEN_SETS = ("vision", "text", "all", "last")  # a cache's anchor_type


def absolute_layer(layer: int, num_layers: int) -> int:
    """hidden_states index in [0, num_layers] from a possibly negative one (-1 = the last)."""
    n = num_layers + 1
    if not -n <= layer < n:
        raise ConfigError(f"layer={layer}: the model has hidden_states[0..{num_layers}]")
    return layer % n


def _compact(hidden: torch.Tensor, keep: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept tokens moved to the front in order, padded/cut to `length`: (B, L, D), (B, L) ->
    (B, length, D) with padding zeroed, and (B, length) bool."""
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # (B, L): kept first
    count = keep.sum(dim=1, keepdim=True)  # (B, 1)
    if order.shape[1] < length:
        order = torch.cat([order, order[:, :1].expand(-1, length - order.shape[1])], dim=1)
    order = order[:, :length]  # (B, length)
    mask = torch.arange(length, device=hidden.device) < count  # (B, length)
    picked = hidden.gather(1, order.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # (B, length, D)
    return picked * mask.unsqueeze(-1).to(picked.dtype), mask


def token_set(context: VLMContext, layer: int, anchor_type: str, max_text: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens of hidden_states[layer] in a token set, at fixed length -> (B, n, D), (B, n) bool.

    n: N_vis (vision), T_max (text), L_max = 1 + N_vis + T_max + Q + 1 (all), 1 (last)."""
    hidden, layout = context.hidden_states[layer], context.layouts[layer]
    batch = hidden.shape[0]
    if anchor_type == "vision":
        vis, mask = context.vision(layer), context.vision_mask(layer)  # (B, N_vis, D), (B, N_vis) | None
        return vis, torch.ones(vis.shape[:2], dtype=torch.bool, device=hidden.device) if mask is None else mask
    if anchor_type == "text":
        text, mask = layout.text(hidden)  # (B, T, D), (B, T)
        return _compact(text, mask, max_text)
    if anchor_type == "all":
        length = hidden.shape[1] - layout.text_index.shape[1] + max_text
        return _compact(hidden, layout.attention_mask.bool(), length)
    if anchor_type == "last":
        last = layout.last_token_index()  # (B,)
        vec = hidden[torch.arange(batch, device=hidden.device), last].unsqueeze(1)  # (B, 1, D)
        return vec, torch.ones(batch, 1, dtype=torch.bool, device=hidden.device)
    raise ConfigError(f"anchor_type={anchor_type!r}: a cache holds one of {CACHE_TOKEN_SETS}")


@dataclass(frozen=True)
class Extraction:
    """One retention target at fixed length, as a cache stores it per sample. `layers`,
    `anchor_type` and `pooling` are None where the target does not read them (actions: all three;
    tokens: pooling)."""

    target: str  # pooled, tokens or actions
    layers: Optional[tuple[int, ...]] = None  # absolute hidden_states indices (pooled: one)
    anchor_type: Optional[str] = None  # one of CACHE_TOKEN_SETS
    pooling: Optional[str] = None  # mean or max (pooled only)

    def __call__(
        self, policy: nn.Module, context: VLMContext, max_text: int
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """pooled -> (B, D); tokens -> (B, n_layers, n, D) and its (B, n) mask; actions -> (B, H, A)."""
        if self.target == "actions":
            return action_target(policy, context, None), None
        if self.target == "pooled":
            layer = self.layers[0]
            if self.anchor_type == "vision":  # exactly C_R, as CRaFT's online pooled target computes it
                return bridge_features(context, layer, pooling=self.pooling, anchor_type="vision"), None
            return pool_tokens(*token_set(context, layer, self.anchor_type, max_text), self.pooling), None
        sets = [token_set(context, i, self.anchor_type, max_text) for i in self.layers]
        return torch.stack([s for s, _ in sets], dim=1), sets[0][1]
