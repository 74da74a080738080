"""The VLM context: what one encoding of an observation gives every consumer.

`VLAPolicy.encode` computes it once; action heads read it (`head.loss`, `head.sample`, any number
of times: a flow head's denoising steps reuse one encoding), and CRaFT's anchors and the anchor
cache pool their bridge features from it with the one `bridge_features` below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from craftvla.errors import ConfigError
from craftvla.model.sequence import TokenLayout

POOLING_MODES = ("mean", "max")
ANCHOR_TYPES = ("both", "vision", "action_query")


@dataclass
class VLMContext:
    """Every LLM layer's hidden states with their layouts, and the normalised proprio state."""

    hidden_states: tuple[torch.Tensor, ...]  # num_layers + 1 tensors (B, L_l, D); [0] = the LLM's input layer
    layouts: tuple[TokenLayout, ...]  # one per hidden state (layers after a token removal are shorter)
    state: torch.Tensor  # (B, S)
    # (B, N, D) the projected patch tokens of every camera as the LLM receives them, read by
    # position-aware heads; when vision tokens were merged (prune/), each position holds the merged
    # token that stands for it (`VisionTokenPruning.merge`), so such a head sees what the LLM sees.
    patches: Optional[torch.Tensor] = None
    # What the policy's pruning part did in this forward (merge_sparsity, keep/<layer>, tokens/<layer>).
    pruning: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.hidden_states) - 1

    def vision(self, layer: int) -> torch.Tensor:  # -> (B, N_l, D) vision-patch states of hidden_states[layer]
        return self.layouts[layer].vision(self.hidden_states[layer])

    def patch_tokens(self) -> torch.Tensor:  # (B, N, D) every patch position's token (see `patches`)
        return self.patches if self.patches is not None else self.vision(0)

    def vision_mask(self, layer: int) -> Optional[torch.Tensor]:  # (B, N_l) bool, None = all visible
        return self.layouts[layer].vision_mask

    def queries(self, layer: int) -> torch.Tensor:  # -> (B, Q, D) action-query states of hidden_states[layer]
        return self.layouts[layer].queries(self.hidden_states[layer])


def default_anchor_layer(num_layers: int) -> int:
    """The hidden_states index of C_R when none is given: the middle layer (CRaFT and the cache)."""
    return num_layers // 2


def pool_tokens(h: torch.Tensor, mask: Optional[torch.Tensor] = None, mode: str = "mean") -> torch.Tensor:
    """Pool token states over the token axis: (B, N, D) with optional (B, N) bool mask -> (B, D).

    Masked-out tokens are ignored; a row with no kept token pools to zeros (not NaN / -inf), so a
    sample whose tokens were all pruned contributes a constant, not a poisoned loss.
    """
    if mode not in POOLING_MODES:
        raise ConfigError(f"pooling must be one of {POOLING_MODES}, got {mode!r}")
    if mask is None:
        return h.mean(dim=1) if mode == "mean" else h.amax(dim=1)
    keep = mask.to(torch.bool).unsqueeze(-1)  # (B, N, 1)
    if mode == "mean":
        count = keep.sum(dim=1).clamp_min(1).to(h.dtype)  # (B, 1)
        return torch.where(keep, h, 0.0).sum(dim=1) / count  # (B, D)
    pooled = h.masked_fill(~keep, float("-inf")).amax(dim=1)  # (B, D)
    return torch.where(keep.any(dim=1), pooled, 0.0)


def bridge_features(
    context: VLMContext, layer: Optional[int] = None, pooling: str = "mean", anchor_type: str = "both"
) -> torch.Tensor:
    """Pooled bridge features: C_R (vision states of hidden_states[layer], default the middle
    layer) and C_AQ (action-query states of the last layer) -> (B, 2D) for "both", (B, D) for
    "vision" / "action_query". Vision tokens masked out in the layout are left out of the pool."""
    if anchor_type not in ANCHOR_TYPES:
        raise ConfigError(f"anchor_type must be one of {ANCHOR_TYPES}, got {anchor_type!r}")
    layer = default_anchor_layer(context.num_layers) if layer is None else layer
    parts = []
    if anchor_type in ("both", "vision"):
        parts.append(pool_tokens(context.vision(layer), context.vision_mask(layer), pooling))  # (B, D)
    if anchor_type in ("both", "action_query"):
        parts.append(pool_tokens(context.queries(-1), None, pooling))  # (B, D)
    return torch.cat(parts, dim=-1)
