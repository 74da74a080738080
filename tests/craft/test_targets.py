"""Retention targets (pooled / tokens / actions), the scale-free loss and its calibration."""

from __future__ import annotations

import copy

import pytest
import torch

from craftvla.craft.config import CraftConfig
from craftvla.craft.functional import retention_loss
from craftvla.craft.plugin import CraftPlugin
from craftvla.craft.targets import combined_retention_loss, compute_targets, feature_variance
from craftvla.errors import ConfigError
from craftvla.model.context import bridge_features
from craftvla.model.heads.l1_bridge import l1_loss

from ._common import batch, small_policy, train_steps


def test_feature_variance_by_hand():
    f = torch.tensor([[1.0, 2.0], [3.0, 6.0]])  # per column, across the 2 samples: var 1 and 4
    assert feature_variance(f).item() == pytest.approx(2.5)
    tokens = torch.tensor([[[0.0], [1.0]], [[2.0], [5.0]]])  # (B=2, N=2, D=1): var 1 and 4 per token
    assert feature_variance(tokens).item() == pytest.approx(2.5)


def test_scaled_loss_by_hand_and_scale_free():
    f, f0 = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 3.0]])
    assert retention_loss(f, f0).item() == pytest.approx(2.5)  # (1 + 4) / 2
    assert retention_loss(f, f0, 2.0).item() == pytest.approx(1.25)
    feats = torch.randn(16, 5)
    for c in (1e-3, 1.0, 40.0):  # the same relative drift costs the same, at any feature scale
        loss = retention_loss(c * (feats + 0.1), c * feats, feature_variance(c * feats))
        assert loss.item() == pytest.approx(0.01 / feature_variance(feats).item(), rel=1e-4)
    terms = {"pooled": (f, f0), "actions": (torch.ones(1, 2), torch.zeros(1, 2))}
    total, parts = combined_retention_loss(terms, {"pooled": torch.tensor(2.0), "actions": torch.tensor(4.0)})
    assert parts["pooled"].item() == pytest.approx(1.25) and parts["actions"].item() == pytest.approx(0.25)
    assert total.item() == pytest.approx((1.25 + 0.25) / 2)


@pytest.mark.parametrize("anchor_type", ["both", "vision", "action_query"])
def test_token_target_is_what_the_pooled_target_pools(anchor_type):
    policy, b = small_policy(), batch(3)
    cfg = CraftConfig(enabled=True, targets="pooled,tokens,actions", anchor_type=anchor_type)
    context = policy.encode(b)
    t = compute_targets(policy, context, cfg)
    layer = policy.anchor_layer()
    n_vis, q, d = context.vision(layer).shape[1], context.queries(-1).shape[1], policy.llm.hidden_size
    assert torch.equal(t["pooled"], bridge_features(context, layer, anchor_type=anchor_type))
    parts = {"both": [n_vis, q], "vision": [n_vis], "action_query": [q]}[anchor_type]
    assert t["tokens"].shape == (3, sum(parts), d)
    means = [chunk.mean(dim=1) for chunk in t["tokens"].split(parts, dim=1)]  # the unpooled states, pooled
    torch.testing.assert_close(torch.cat(means, dim=-1), t["pooled"])


def test_action_target_is_the_chunk_the_task_loss_scores():
    policy, b = small_policy(), batch(4)
    out = policy.compute_loss(b)
    actions = compute_targets(policy, out.context, CraftConfig(enabled=True, targets="actions"))["actions"]
    assert actions.shape == (4, policy.config.chunk_size, policy.config.action_dim)
    torch.testing.assert_close(l1_loss(actions, b["action"], b["action_is_pad"]), out.metrics["l1_loss"])


def test_online_action_anchors_are_the_initial_policy_actions():
    """The action head moves during training; the anchors still give the frozen initial head's chunk."""
    policy = small_policy()
    frozen = copy.deepcopy(policy)
    plugin = CraftPlugin(policy, CraftConfig(enabled=True, targets="actions,pooled"))
    train_steps(policy, plugin, [[batch(2, seed=s)] for s in range(3)], lr=0.05)
    b = batch(3, seed=9)
    with torch.no_grad():
        now = policy.action_head.sample(policy.encode(b))
        initial = frozen.action_head.sample(frozen.encode(b))
    assert (now - initial).abs().max() > 1e-3  # the head did move
    torch.testing.assert_close(plugin.anchors.features(policy, b)["actions"], initial, rtol=0, atol=1e-6)


def test_calibration_measures_the_initial_spread_and_scales_the_loss():
    policy = small_policy()
    cfg = CraftConfig(enabled=True, targets="pooled,actions", dual_lr=0.0, log_freq=1)
    plugin = CraftPlugin(policy, cfg)
    batches = [batch(8, seed=s) for s in range(3)]
    scales = plugin.calibrate(batches)
    with torch.no_grad():
        direct = [compute_targets(policy, policy.encode(b), cfg) for b in batches]
    for name in ("pooled", "actions"):
        expected = feature_variance(torch.cat([d[name] for d in direct]))
        assert scales[name] == pytest.approx(expected.item(), rel=1e-5)
    train_steps(policy, plugin, [[batch(4, seed=5)]], lr=0.5)  # move the weights
    b = batch(4, seed=6)
    out = policy.compute_loss(b)
    pairs = plugin.anchors.retention_pairs(policy, b, out.context)
    raw = {k: retention_loss(f, f0).item() for k, (f, f0) in pairs.items()}
    log = train_steps(policy, plugin, [[b]], lr=0.0)[0]
    assert log["craft/ret/pooled"] == pytest.approx(raw["pooled"] / scales["pooled"], rel=1e-4)
    assert log["craft/ret/actions"] == pytest.approx(raw["actions"] / scales["actions"], rel=1e-4)
    assert log["craft/retention_loss"] == pytest.approx((log["craft/ret/pooled"] + log["craft/ret/actions"]) / 2)
    assert plugin.state_dict()["scales"] == pytest.approx(scales)  # saved with the training state
    restored = CraftPlugin(copy.deepcopy(policy), cfg)
    restored.load_state_dict(plugin.state_dict())
    assert {k: float(v) for k, v in restored.scales.items()} == pytest.approx(scales)


def test_anchor_dataset_batches_replace_the_training_batch():
    """With an anchor stream, the targets are computed on its batches (not the task batch)."""
    policy = small_policy()
    anchor_batches = [batch(5, seed=100 + i) for i in range(4)]
    started = []

    def stream(step):
        started.append(step)
        return iter(anchor_batches[step:])

    plugin = CraftPlugin(policy, CraftConfig(enabled=True, targets="actions"), anchor_batches=stream)
    plugin.step = 1  # as after a resume: the stream must start at that step
    b = batch(2, seed=1)
    out = policy.compute_loss(b)
    plugin.anchors.start(plugin.step)
    ((f, f0),) = plugin.anchors.retention_pairs(policy, b, out.context).values()
    assert f.shape[0] == f0.shape[0] == 5 and started == [1]
    with torch.no_grad():
        expected = policy.action_head.sample(policy.encode(anchor_batches[1]))
    torch.testing.assert_close(f0, expected)  # weights unchanged: anchors == current on the anchor batch


def test_unknown_target_is_a_config_error():
    with pytest.raises(ConfigError, match="craft.targets"):
        CraftConfig(enabled=True, targets="pooled,behaviour")
    with pytest.raises(ConfigError, match="craft.targets"):
        CraftConfig(enabled=True, targets="actions,actions")
    with pytest.raises(ConfigError, match="craft.anchor_dataset"):
        CraftConfig(enabled=True, anchor_cache="c", anchor_dataset="d")


def test_default_target_follows_the_anchor_data():
    """The retention study's finding as the default: actions with old-task anchor data, else pooled."""
    assert CraftConfig(enabled=True).target_names == ["pooled"]
    assert CraftConfig(enabled=True, anchor_dataset="old_tasks").target_names == ["actions"]
    assert CraftConfig(enabled=True, anchor_dataset="old_tasks", targets="tokens").target_names == ["tokens"]
