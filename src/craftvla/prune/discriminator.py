"""The discriminator of stage 2: real (without selection) vs fake (pruned) LLM hidden states.

It reads the states of the tokens that exist in both models — the instruction and action-query
tokens — at the layer after each pruning point, and gives one logit per token; a learned layer
embedding tells the layers apart. The pruners are trained to make their states indistinguishable
(`adversarial_loss`, non-saturating); the discriminator with `discriminator_loss` (binary cross-entropy).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from craftvla.model.context import VLMContext


def shared_tokens(context: VLMContext, layer: int) -> torch.Tensor:
    """(B, T + Q, D): instruction and action-query states of hidden_states[layer] (padding included;
    see `shared_mask`)."""
    text, _ = context.layouts[layer].text(context.hidden_states[layer])
    return torch.cat([text, context.queries(layer)], dim=1)


def shared_mask(context: VLMContext, layer: int) -> torch.Tensor:  # (B, T + Q) bool
    layout = context.layouts[layer]
    return torch.cat([layout.text_mask, torch.ones_like(layout.query_index, dtype=torch.bool)], dim=1)


class Discriminator(nn.Module):
    """Token states (B, N, D) of pruning layer i -> logits (B, N) (real = without selection)."""

    def __init__(self, dim: int, num_layers: int, hidden_dim: int = 128):
        super().__init__()
        self.layer_embed = nn.Embedding(num_layers, dim)
        nn.init.zeros_(self.layer_embed.weight)
        self.net = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden_dim),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden_dim, hidden_dim),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden_dim, 1),
        )

    def forward(self, states: torch.Tensor, index: int) -> torch.Tensor:
        return self.net(states + self.layer_embed.weight[index]).squeeze(-1)


def _masked_bce(logits: torch.Tensor, target: float, mask: torch.Tensor) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target), reduction="none")
    return (loss * mask).sum() / mask.sum().clamp_min(1)


def discriminator_loss(
    disc: Discriminator, real: list[torch.Tensor], fake: list[torch.Tensor], masks: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(real loss, fake loss): BCE of real states as 1 and (detached) fake states as 0, per layer."""
    real_loss = sum(_masked_bce(disc(r, i), 1.0, m.float()) for i, (r, m) in enumerate(zip(real, masks))) / len(real)
    fake_loss = sum(
        _masked_bce(disc(f.detach(), i), 0.0, m.float()) for i, (f, m) in enumerate(zip(fake, masks))
    ) / len(fake)
    return real_loss, fake_loss


def adversarial_loss(disc: Discriminator, fake: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
    """Non-saturating generator loss: -log D(fake), i.e. BCE of fake states as real."""
    return sum(_masked_bce(disc(f, i), 1.0, m.float()) for i, (f, m) in enumerate(zip(fake, masks))) / len(fake)


def distillation_loss(real: list[torch.Tensor], fake: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
    """The ablation's plain feature distillation: MSE of pruned to unpruned states (shared tokens)."""
    total = 0.0
    for r, f, m in zip(real, fake, masks):
        err = (f - r.detach()).pow(2).mean(-1)  # (B, N)
        total = total + (err * m).sum() / m.sum().clamp_min(1)
    return total / len(real)
