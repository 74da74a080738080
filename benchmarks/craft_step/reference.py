"""The reference CRaFT step the library's is measured against (bench.py's "swap" row) and
checked against (tests/craft/test_functional.py): the straightforward way to write CRaFT.

- `SwapAnchors`: anchor features by copying a CPU snapshot of the initial weights into the
  model, running a no-grad forward, and copying the current weights back (two host<->device
  copies of every trainable tensor per step).
- `project_gradients_reference`: the explicit two-stage surgery (project g_act away from g_ret
  when they conflict, then add lam * g_ret) as a Python loop over tensors.
- `ReferenceCraftPlugin`: `CraftPlugin` with both of the above in place of the library's
  exact online anchors and flat one-pass surgery.
Not part of the library: the library's versions are exact and faster (results.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from craftvla.craft.config import CraftConfig
from craftvla.craft.plugin import CraftPlugin


class SwapAnchors:
    description = "weight swap through a CPU snapshot (reference)"

    def __init__(self, policy: nn.Module, feature_fn):
        self.feature_fn = feature_fn
        self.initial = {n: p.detach().clone().cpu() for n, p in policy.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def features(self, policy: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        params = dict(policy.named_parameters())
        current = {n: params[n].data.clone().cpu() for n in self.initial}  # save the current weights
        for name, value in self.initial.items():  # swap the initial ones in
            params[name].data.copy_(value.to(params[name].device))
        try:
            return self.feature_fn(policy.encode(batch))
        finally:
            for name, value in current.items():  # and the current ones back
                params[name].data.copy_(value.to(params[name].device))

    def retention_pairs(self, policy: nn.Module, batch: dict, context) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        anchor = self.features(policy, batch)
        return {k: (f, anchor[k]) for k, f in self.feature_fn(context).items()}


def project_gradients_reference(
    g_act: Sequence[torch.Tensor],
    g_ret: Sequence[torch.Tensor],
    lam: float,
    eps: float = 1e-8,
    scope: str = "per_tensor",
    enable_projection: bool = True,
) -> list[torch.Tensor]:
    """Project g_act if it conflicts with g_ret, then add lam * g_ret; returns new tensors."""
    if scope == "global":
        dot = sum((a.double() * r.double()).sum() for a, r in zip(g_act, g_ret))
        ret_sq = sum((r.double() ** 2).sum() for r in g_ret)
        coef = dot / (ret_sq + eps) if (enable_projection and dot < 0) else 0.0
        return [a - coef * r + lam * r for a, r in zip(g_act, g_ret)]
    out = []
    for a, r in zip(g_act, g_ret):
        a_flat, r_flat = a.flatten(), r.flatten()
        dot = torch.dot(a_flat, r_flat)
        if enable_projection and dot < 0:
            a_flat = a_flat - dot / (torch.dot(r_flat, r_flat) + eps) * r_flat
        out.append((a_flat + lam * r_flat).reshape(a.shape))
    return out


class ReferenceCraftPlugin(CraftPlugin):
    """CraftPlugin with swap anchors and the per-tensor loop (for mode="craft" with features)."""

    def __init__(self, policy: nn.Module, cfg: CraftConfig, seed: int = 0, log_freq: int = 1):
        super().__init__(policy, cfg, seed, log_freq)
        self.anchors = SwapAnchors(policy, self._features)

    def _combine(self) -> dict[str, torch.Tensor]:
        lam = float(self.lam)
        out = project_gradients_reference(
            self._act_views,
            self._ret_views,
            lam,
            self.cfg.projection_eps,
            self.cfg.projection_scope,
            self.cfg.projection_on,
        )
        for view, value in zip(self._act_views, out):
            view.copy_(value)
        zero = torch.zeros((), device=self.lam.device)
        return {"l_ret": self._l_ret[0].clone(), "cos": zero, "beta": zero + lam, "conflict": zero}
