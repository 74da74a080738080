"""CRaFT as pure tensor functions: retention loss, gradient surgery, dual update. Nothing here
knows about models, optimizers or the training loop (the bridge features it constrains are pooled
by `craftvla.model.context.bridge_features`).

The surgery is written in its "beta form": projecting ``g_act`` away from ``g_ret`` when they
conflict and then adding ``lam * g_ret`` gives ``g_act + beta * g_ret`` with

    beta = lam - [<g_act, g_ret> < 0] * <g_act, g_ret> / (||g_ret||^2 + eps)

so one step needs two reductions (the dot product and ``||g_ret||^2``; ``||g_act||^2`` only for
the logged cosine) and one fused multiply-add, whatever the number of parameter tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from craftvla.errors import ConfigError, CraftVLAError

PROJECTION_SCOPES = ("global", "per_tensor")


def retention_loss(f: torch.Tensor, f_anchor: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """L_ret = MSE(f, f_anchor) / scale, mean over all elements: (B, ...), (B, ...) -> scalar. No
    gradient flows into the anchor. `scale` makes it scale-free (craft/targets.py's feature_variance)."""
    if f.shape != f_anchor.shape:
        raise CraftVLAError(
            f"retention features {tuple(f.shape)} and anchor features {tuple(f_anchor.shape)} "
            "differ in shape (different target, anchor_type, pooling or model width?)"
        )
    return F.mse_loss(f, f_anchor.detach().to(f.dtype)) / scale


def surgery_beta(
    dot: torch.Tensor, ret_sq: torch.Tensor, lam, eps: float = 1e-8, enable_projection: bool = True
) -> torch.Tensor:
    """beta with g_act + beta * g_ret == project-then-add; elementwise, so () -> () and (K,) -> (K,).

    ``dot`` = <g_act, g_ret>, ``ret_sq`` = ||g_ret||^2, ``lam`` a float or 0-d tensor.
    """
    lam = torch.as_tensor(lam, dtype=dot.dtype, device=dot.device)
    if not enable_projection:
        return lam + torch.zeros_like(dot)
    coef = dot / (ret_sq + eps)
    return lam - torch.where(dot < 0, coef, torch.zeros_like(coef))


def dual_update(lam, l_ret, budget: float, lr: float, relative: bool = False):
    """Projected dual ascent on the retention constraint: max(0, lam + lr * (L_ret - budget)); with
    `relative`, on the constraint written in units of the budget, L_ret / budget - 1 <= 0:
    max(0, lam + lr * (L_ret / budget - 1)), so one step size moves lambda alike for every budget.

    Works on floats or tensors (a device tensor stays on the device: no sync)."""
    violation = (l_ret / budget - 1.0) if relative else (l_ret - budget)
    if isinstance(lam, torch.Tensor) or isinstance(l_ret, torch.Tensor):
        return torch.clamp(torch.as_tensor(lam) + lr * violation, min=0.0)
    return max(0.0, lam + lr * violation)


def _flat_reductions(a: torch.Tensor, r: torch.Tensor, lengths: torch.Tensor | None):
    """Dot, ||a||^2, ||r||^2 of flat (P,) vectors, in float32: -> three (K,) tensors, K segments
    of the given ``lengths`` (K = 1 when lengths is None)."""
    a32, r32 = a.float(), r.float()  # no-op for float32 buffers
    if lengths is None:
        return (torch.dot(a32, r32).reshape(1), torch.dot(a32, a32).reshape(1), torch.dot(r32, r32).reshape(1))
    seg = lambda x: torch.segment_reduce(x, "sum", lengths=lengths)  # noqa: E731  one kernel
    return seg(a32 * r32), seg(a32 * a32), seg(r32 * r32)


def project_flat(
    g_act: torch.Tensor,
    g_ret: torch.Tensor,
    lam,
    eps: float = 1e-8,
    lengths: torch.Tensor | None = None,
    enable_projection: bool = True,
) -> dict[str, torch.Tensor]:
    """Surgery on flat (P,) gradient vectors, in place: g_act <- g_act + beta * g_ret.

    ``lengths`` (K,) splits the vector into K parameter tensors laid end to end for per-tensor
    projection (one beta per segment); None projects the whole vector (one beta). Returns stats
    as 0-d tensors (no host sync): dot and cos of the whole vectors, beta (mean over segments),
    conflict (1.0 if conflicting; per tensor, the fraction of segments that conflict).
    """
    dots, act_sq, ret_sq = _flat_reductions(g_act, g_ret, lengths)  # (K,) each
    beta = surgery_beta(dots, ret_sq, lam, eps, enable_projection)  # (K,)
    if lengths is None:
        g_act.addcmul_(g_ret, beta.to(g_act.dtype).squeeze(0))  # fused, no temporary
    else:
        full = beta.to(g_act.dtype).repeat_interleave(lengths, output_size=g_act.numel())  # (P,)
        g_act.addcmul_(g_ret, full)
    return _stats(dots, act_sq, ret_sq, beta)


def _stats(dots, act_sq, ret_sq, beta) -> dict[str, torch.Tensor]:
    dot = dots.sum()
    cos = dot / (act_sq.sum().sqrt() * ret_sq.sum().sqrt()).clamp_min(1e-30)
    return {"dot": dot, "cos": cos, "beta": beta.mean(), "conflict": (dots < 0).float().mean()}


def project_gradients(
    g_act: Sequence[torch.Tensor],
    g_ret: Sequence[torch.Tensor],
    lam,
    eps: float = 1e-8,
    scope: str = "global",
    enable_projection: bool = True,
) -> dict[str, torch.Tensor]:
    """Surgery on lists of per-parameter gradients, in place: g_act[i] <- g_act[i] + beta * g_ret[i].

    scope "global": one beta from the whole trainable-parameter vector (the formula's meaning);
    "per_tensor": one beta per tensor. Vectorised: the reductions run on one flattened copy
    (a fixed number of kernels whatever the number of tensors) and the update is one foreach
    multiply-add. Callers that own flat buffers should call ``project_flat`` (no copy).
    """
    if scope not in PROJECTION_SCOPES:
        raise ConfigError(f"projection_scope must be one of {PROJECTION_SCOPES}, got {scope!r}")
    if len(g_act) != len(g_ret):
        raise CraftVLAError(f"{len(g_act)} action gradients but {len(g_ret)} retention gradients")
    flat_a = torch.cat([g.reshape(-1) for g in g_act])  # (P,) views -> one copy
    flat_r = torch.cat([g.reshape(-1) for g in g_ret])  # (P,)
    lengths = None
    if scope == "per_tensor":
        lengths = torch.tensor([g.numel() for g in g_act], device=flat_a.device)  # (K,)
    dots, act_sq, ret_sq = _flat_reductions(flat_a, flat_r, lengths)
    beta = surgery_beta(dots, ret_sq, lam, eps, enable_projection)  # (1,) or (K,)
    betas = list(beta.to(g_act[0].dtype).expand(len(g_act)).unbind())  # K views, no copies
    torch._foreach_add_(list(g_act), torch._foreach_mul(list(g_ret), betas))
    return _stats(dots, act_sq, ret_sq, beta)
