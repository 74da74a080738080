"""Keep/drop decisions for vision tokens: Gumbel-perturbed top-k with a straight-through estimator.

Training draws a *budgeted* keep mask: each token's score gets Gumbel noise, the top k perturbed
scores are kept (the same rule as inference, where the noise is off), and the backward pass sees a
temperature-tau sigmoid around the k-th / (k+1)-th threshold (Gumbel-softmax relaxed to keep/drop).
As tau anneals from 1.0 to 0.1 the relaxation approaches the hard mask it stands in for.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from craftvla.errors import ConfigError

SCHEDULES = ("exponential", "linear", "cosine")


def temperature_at(step: int, total: int, start: float = 1.0, end: float = 0.1, schedule: str = "exponential") -> float:
    """The annealed temperature at `step` of `total` (start at 0, end from `total` on)."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"temperature schedule must be one of {SCHEDULES}, got {schedule!r}")
    t = min(max(step / max(total, 1), 0.0), 1.0)
    if schedule == "exponential":
        return start * (end / start) ** t
    if schedule == "linear":
        return start + (end - start) * t
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def gumbel_noise(shape, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """Standard Gumbel samples -log(-log U)."""
    u = torch.rand(shape, generator=generator, device=device).clamp(1e-9, 1.0 - 1e-9)
    return -torch.log(-torch.log(u))


def topk_columns(scores: torch.Tensor, k: int, alive: Optional[torch.Tensor] = None) -> torch.Tensor:
    """scores (B, N) -> the columns (B, k) of the k highest, ascending; `alive` (B, N) bool excludes the rest."""
    if alive is not None:
        scores = scores.masked_fill(~alive, float("-inf"))
    return scores.topk(k, dim=1).indices.sort(dim=1).values


def relaxed_keep(
    scores: torch.Tensor,
    k: int,
    tau: float,
    noise: bool = True,
    alive: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Relaxed keep weights (B, N) in [0, 1]: sigmoid((z - threshold) / tau), z the scores (+ Gumbel
    noise) and the threshold halfway between the k-th and (k+1)-th highest z, so that exactly the
    top k exceed 0.5 (ties aside): `weights > 0.5` is the hard decision. `alive` (B, N) bool: tokens
    dropped at an earlier layer get weight 0 (no gradient)."""
    n = scores.shape[1]
    z = scores + gumbel_noise(scores.shape, generator, scores.device) if noise else scores
    if alive is not None:
        z = z.masked_fill(~alive, float("-inf"))
    if k >= n:
        return torch.ones_like(scores)
    top = z.detach().topk(k + 1, dim=1).values  # (B, k + 1)
    threshold = 0.5 * (top[:, k - 1] + top[:, k]).unsqueeze(1)  # (B, 1)
    threshold = torch.where(torch.isfinite(threshold), threshold, top[:, k - 1 : k] - 1.0)  # fewer than k+1 alive
    return torch.where(torch.isfinite(z), torch.sigmoid((z - threshold) / tau), 0.0)


def straight_through_keep(
    scores: torch.Tensor,
    k: int,
    tau: float,
    noise: bool = True,
    alive: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """A keep mask (B, N): exactly 1 for the top k of scores (+ Gumbel noise), 0 elsewhere in the
    forward pass, with the gradient of `relaxed_keep` (straight-through)."""
    soft = relaxed_keep(scores, k, tau, noise, alive, generator)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + (soft - soft.detach())  # = hard exactly in the forward pass
