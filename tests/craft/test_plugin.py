"""CraftPlugin against a small real policy: exact anchors, LoRA, accumulation, dual rule, resume."""

import copy

import pytest
import torch

from benchmarks.craft_step.reference import project_gradients_reference
from craftvla.craft import functional as CF
from craftvla.craft.config import CraftConfig
from craftvla.craft.plugin import CraftPlugin
from craftvla.errors import ConfigError, CraftVLAError
from craftvla.model.context import bridge_features

from ._common import batch, small_policy, split, train_steps


def _features(policy, b, **kw):
    with torch.no_grad():
        return bridge_features(policy.encode(b), **kw)


@pytest.mark.parametrize("anchor_type", ["both", "vision"])
def test_online_anchors_equal_frozen_copy(anchor_type):
    policy = small_policy()
    policy.vision.requires_grad_(False)  # a frozen part must stay out of the initial copies
    frozen = copy.deepcopy(policy)
    plugin = CraftPlugin(policy, CraftConfig(enabled=True, anchor_type=anchor_type))
    train_steps(policy, plugin, [[batch(2, seed=s)] for s in range(2)], lr=0.05)
    b = batch(3, seed=9)
    assert not torch.equal(_features(policy, b, anchor_type=anchor_type), _features(frozen, b, anchor_type=anchor_type))
    assert torch.equal(plugin.anchors.features(policy, b)["pooled"], _features(frozen, b, anchor_type=anchor_type))
    kept = set(plugin.anchors.initial)
    assert "action_queries.weight" in kept and not any(n.startswith(("vision.", "action_head.")) for n in kept)


def test_online_anchors_under_lora_exact_and_only_adapters_change():
    from craftvla.model.peft import LoraConfig, apply_lora, is_lora_param

    policy = small_policy()
    base = copy.deepcopy(policy)  # the initial model, before any adapter exists
    apply_lora(policy, LoraConfig(rank=4, alpha=8.0))
    policy.vision.requires_grad_(False)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    plugin = CraftPlugin(policy, CraftConfig(enabled=True))
    assert plugin.anchors.lora and "lora adapters disabled" in plugin.anchors.description.lower()
    assert not any(is_lora_param(n) for n in plugin.anchors.initial)
    train_steps(policy, plugin, [[batch(2, seed=s)] for s in range(3)], lr=0.05)

    b = batch(3, seed=9)
    assert torch.equal(plugin.anchors.features(policy, b)["pooled"], _features(base, b))
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == trainable  # flags restored
    changed = {n for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert all(is_lora_param(n) for n in changed if n.startswith("llm."))
    assert any("lora_B" in n for n in changed) and "action_queries.weight" in changed


def _grads(plugin):
    return torch.cat([p.grad.flatten() for p in plugin.params])


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_accumulation_2x4_equals_batch_8(scope):
    cfg = CraftConfig(enabled=True, projection_scope=scope, log_freq=1)
    b8 = batch(8, seed=3)
    p_big, p_acc = small_policy(), small_policy()
    # one earlier step on another batch so that the features have drifted from the anchors
    for pol in (p_big, p_acc):
        pol._plugin = CraftPlugin(pol, cfg)
        train_steps(pol, pol._plugin, [[batch(4, seed=11)]], lr=0.05)
    p_big._plugin.backward(p_big, b8, 1.0)
    for half in (split(b8, 0, 4), split(b8, 4, 8)):
        p_acc._plugin.backward(p_acc, half, 0.5)
    p_big._plugin.before_optimizer_step()
    p_acc._plugin.before_optimizer_step()
    torch.testing.assert_close(_grads(p_acc._plugin), _grads(p_big._plugin), rtol=1e-4, atol=1e-7)
    for key in ("l_ret", "dot", "beta"):
        torch.testing.assert_close(p_acc._plugin._pending[key], p_big._plugin._pending[key], rtol=1e-4, atol=1e-9)


def test_surgery_result_matches_explicit_reference():
    """The plug-in's combined gradient equals project-then-add on separately computed grads."""
    policy = small_policy()
    plugin = CraftPlugin(policy, CraftConfig(enabled=True, retention_weight=0.7))
    train_steps(policy, plugin, [[batch(2, seed=1)]], lr=0.05)
    b = batch(2, seed=2)
    out = policy.compute_loss(b)
    ((f_theta, f_anchor),) = plugin.anchors.retention_pairs(policy, b, out.context).values()
    g_ret = torch.autograd.grad(
        CF.retention_loss(f_theta, f_anchor), plugin.params, retain_graph=True, allow_unused=True
    )
    g_act = torch.autograd.grad(out.loss, plugin.params, allow_unused=True)
    zero = lambda gs: [torch.zeros_like(p) if g is None else g for g, p in zip(gs, plugin.params)]  # noqa: E731
    lam = float(plugin.lam)
    expected = project_gradients_reference(zero(g_act), zero(g_ret), lam, scope="global")
    plugin.backward(policy, b, 1.0)
    plugin.before_optimizer_step()
    torch.testing.assert_close(_grads(plugin), torch.cat([e.flatten() for e in expected]).float(), rtol=1e-4, atol=1e-7)


def test_lambda_follows_dual_rule_and_survives_resume():
    cfg = CraftConfig(enabled=True, retention_weight=0.5, retention_budget=0.05, dual_lr=2.0, log_freq=1)
    policy = small_policy()
    plugin = CraftPlugin(policy, cfg)
    logs = train_steps(policy, plugin, [[batch(2, seed=s)] for s in range(4)], lr=0.05)
    lam = cfg.retention_weight
    for entry in logs:
        lam = CF.dual_update(lam, entry["craft/retention_loss"], cfg.retention_budget, cfg.dual_lr)
        assert entry["craft/lambda"] == pytest.approx(lam, rel=1e-5, abs=1e-6)
    assert len({round(e["craft/lambda"], 6) for e in logs}) > 1  # it actually moved

    restored = CraftPlugin(copy.deepcopy(policy), cfg)
    restored.load_state_dict(plugin.state_dict())
    assert (
        restored.state_dict()
        == plugin.state_dict()
        == {"lambda": pytest.approx(lam), "step": 4, "scales": {"pooled": 1.0}}
    )
    with pytest.raises(CraftVLAError, match="lambda"):
        restored.load_state_dict({"step": 1})


def test_relative_dual_rule_reaches_the_plugin():
    """--craft.dual_relative: lambda moves by dual_lr * (L_ret / epsilon - 1) per step, by hand."""
    cfg = CraftConfig(enabled=True, retention_budget=0.05, dual_lr=0.3, dual_relative=True, log_freq=1)
    policy = small_policy()
    logs = train_steps(policy, CraftPlugin(policy, cfg), [[batch(2, seed=s)] for s in range(3)], lr=0.05)
    lam = 1.0
    for entry in logs:
        lam = max(0.0, lam + 0.3 * (entry["craft/retention_loss"] / 0.05 - 1.0))
        assert entry["craft/lambda"] == pytest.approx(lam, rel=1e-5, abs=1e-6)
    with pytest.raises(ConfigError, match="dual_relative"):
        CraftConfig(enabled=True, retention_budget=0.0, dual_relative=True)


def test_log_freq_averages_and_baselines():
    policy = small_policy()
    plugin = CraftPlugin(policy, CraftConfig(enabled=True, mode="distill_fixed", log_freq=2))
    logs = train_steps(policy, plugin, [[batch(2, seed=s)] for s in range(4)], lr=0.05)
    assert (
        logs[0] == {}
        and logs[2] == {}
        and set(logs[1]) == {"craft/retention_loss", "craft/lambda", "craft/conflict", "craft/cos", "craft/beta"}
    )
    assert logs[3]["craft/lambda"] == 1.0 and logs[3]["craft/beta"] == pytest.approx(1.0)  # fixed, no projection

    policy = small_policy()
    init = [p.detach().clone() for p in policy.parameters() if p.requires_grad]
    plugin = CraftPlugin(policy, CraftConfig(enabled=True, mode="l2_init", retention_weight=3.0, log_freq=1))
    assert plugin.anchors is None
    train_steps(policy, plugin, [[batch(2, seed=0)]], lr=0.05)
    b = batch(2, seed=1)
    out = policy.compute_loss(b)
    g_act = torch.autograd.grad(out.loss, plugin.params, allow_unused=True)
    plugin.backward(policy, b, 1.0)
    plugin.before_optimizer_step()
    expected = [
        (torch.zeros_like(p) if g is None else g) + 3.0 * (p.detach() - p0)
        for g, p, p0 in zip(g_act, plugin.params, init)
    ]
    torch.testing.assert_close(_grads(plugin), torch.cat([e.flatten() for e in expected]), rtol=1e-5, atol=1e-7)
    penalty = 1.5 * sum(((p.detach() - p0) ** 2).sum() for p, p0 in zip(plugin.params, init))
    assert plugin.after_optimizer_step()["craft/retention_loss"] == pytest.approx(float(penalty), rel=1e-4)


def test_errors_name_the_field():
    with pytest.raises(ConfigError, match="craft.mode"):
        CraftConfig(mode="ewc")
    with pytest.raises(ConfigError, match="craft.anchor_cache"):
        CraftConfig(anchor_source="cache")
    with pytest.raises(ConfigError, match="craft.projection_scope"):
        CraftConfig(projection_scope="per_layer")
    policy = small_policy()
    with pytest.raises(CraftVLAError, match="/nonexistent: no meta.json"):
        CraftPlugin(policy, CraftConfig(anchor_source="cache", anchor_cache="/nonexistent", anchor_type="vision"))
    plugin = CraftPlugin(policy, CraftConfig(enabled=True))
    with pytest.raises(CraftVLAError, match="without any backward"):
        plugin.before_optimizer_step()


def test_auxiliary_loss_reaches_g_act():
    """An auxiliary loss registered on the policy is part of L_act: CRaFT's g_act gains exactly its
    gradient (here sum(C * action_queries), whose gradient is C) and nothing else changes."""
    policy = small_policy()
    twin = copy.deepcopy(policy)
    coeff = torch.randn_like(policy.action_queries.weight)
    twin.add_aux_loss("pull", lambda context, b: ((twin.action_queries.weight * coeff).sum(), {}), weight=2.0)
    grads = []
    for model in (policy, twin):
        plugin = CraftPlugin(model, CraftConfig(enabled=True))
        metrics = plugin.backward(model, batch(2, seed=4), 1.0)
        index = next(i for i, p in enumerate(plugin.params) if p is model.action_queries.weight)
        grads.append([v.clone() for v in plugin._act_views] + [index])
    *plain, index = grads[0]
    *with_aux, _ = grads[1]
    for i, (a, b) in enumerate(zip(plain, with_aux)):
        expected = a + 2.0 * coeff if i == index else a
        torch.testing.assert_close(b, expected, rtol=0, atol=1e-6)
    assert "aux/pull" in metrics
