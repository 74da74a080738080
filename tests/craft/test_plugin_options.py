"""Every CRaFT option through the plug-in, against an independent computation: features pooled by
hand from a frozen copy of the initial policy, gradients by autograd, the surgery by the explicit
reference loop (benchmarks/craft_step/reference.py), lambda by the dual rule written out."""

import copy

import pytest
import torch

from benchmarks.craft_step.reference import project_gradients_reference
from craftvla.craft.config import CraftConfig
from craftvla.craft.plugin import CraftPlugin

from ._common import batch, small_policy, train_steps

W0, DUAL_LR, BUDGET = 0.7, 0.5, 1e-4

OPTIONS = {  # id -> (CraftConfig fields, how the final gradient is formed, whether lambda moves)
    "default": ({}, "project_global", True),
    "action_query": ({"anchor_type": "action_query"}, "project_global", True),
    "vision": ({"anchor_type": "vision"}, "project_global", True),
    "max_pooling": ({"pooling": "max"}, "project_global", True),
    "layer_1": ({"anchor_layer_idx": 1}, "project_global", True),
    "projection_off": ({"enable_projection": False}, "sum", True),
    "per_tensor": ({"projection_scope": "per_tensor"}, "project_per_tensor", True),
    "dual_only": ({"mode": "dual_only"}, "sum", True),
    "distill_fixed": ({"mode": "distill_fixed"}, "sum", False),
}


def _by_hand(context, anchor_type="both", pooling="mean", layer=None):
    """The pooled bridge features written out: vision states of `layer` (default the middle one)
    and the last layer's action-query states, each reduced over tokens."""
    reduce = (lambda x: x.mean(dim=1)) if pooling == "mean" else (lambda x: x.amax(dim=1))
    parts = []
    if anchor_type in ("both", "vision"):
        parts.append(reduce(context.vision(context.num_layers // 2 if layer is None else layer)))
    if anchor_type in ("both", "action_query"):
        parts.append(reduce(context.queries(-1)))
    return torch.cat(parts, dim=-1)  # (B, D) or (B, 2D)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_against_an_independent_computation(name):
    fields, combine, dual = OPTIONS[name]
    cfg = CraftConfig(
        enabled=True,
        retention_weight=W0,
        dual_lr=DUAL_LR,
        retention_budget=BUDGET,
        scale_free=False,
        targets="pooled",
        log_freq=1,
        **fields,
    )
    policy = small_policy()
    initial = copy.deepcopy(policy).eval()
    plugin = CraftPlugin(policy, cfg)
    (log,) = train_steps(policy, plugin, [[batch(4, seed=1)]], lr=0.2)  # drift far enough to conflict
    lam = max(0.0, W0 + DUAL_LR * (log["craft/retention_loss"] - BUDGET)) if dual else W0
    assert plugin.lam == pytest.approx(lam, rel=1e-5)
    assert (plugin.lam != W0) == dual

    b = batch(4, seed=2)
    feature = dict(anchor_type=cfg.anchor_type or "both", pooling=cfg.pooling or "mean", layer=cfg.anchor_layer_idx)
    with torch.no_grad():
        f_anchor = _by_hand(initial.encode(b), **feature)
    out = policy.compute_loss(b)
    l_ret = (_by_hand(out.context, **feature) - f_anchor).pow(2).mean()
    params = plugin.params
    g_ret = torch.autograd.grad(l_ret, params, retain_graph=True, allow_unused=True)
    g_act = torch.autograd.grad(out.loss, params, allow_unused=True)
    g_ret, g_act = ([torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)] for gs in (g_ret, g_act))
    if combine == "sum":
        expected = [a + lam * r for a, r in zip(g_act, g_ret)]
    else:
        expected = project_gradients_reference(g_act, g_ret, lam, scope=combine.removeprefix("project_"))

    plugin.backward(policy, b, 1.0)
    plugin.before_optimizer_step()
    got = torch.cat([p.grad.flatten() for p in params])
    torch.testing.assert_close(got, torch.cat([e.flatten() for e in expected]).float(), rtol=1e-4, atol=1e-7)
    assert float(plugin._pending["l_ret"]) == pytest.approx(l_ret.item(), rel=1e-5)
    if combine != "sum":  # the case is one where the projection does something
        assert not torch.allclose(got, torch.cat([(a + lam * r).flatten() for a, r in zip(g_act, g_ret)]))
