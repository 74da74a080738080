"""CRaFT's cost options (issue 33): memoised teacher targets, a fixed anchor set, and the
retention gradient recomputed every k steps. Each is checked against the exact version."""

import dataclasses

import pytest
import torch

from craftvla.craft import functional as CF
from craftvla.craft.config import CraftConfig
from craftvla.craft.data import fixed_frames
from craftvla.craft.plugin import CraftPlugin
from craftvla.data.loading import collate, select_rows
from craftvla.errors import ConfigError, CraftVLAError
from craftvla.keys import SOURCE_KEY
from tests.craft._common import batch, small_config, small_policy, train_steps


def indexed(size: int, seed: int, first: int) -> dict:
    """A fake anchor batch whose frames are `first .. first+size-1` of some dataset."""
    b = batch(size, seed=seed)
    b["index"] = torch.arange(first, first + size)
    return b


def frames(indices: list[int]) -> dict:
    """A batch of the given frame indices, each frame's content a function of its index alone."""
    parts = [indexed(1, seed=1000 + i, first=i) for i in indices]
    return {
        k: torch.cat([p[k] for p in parts]) if torch.is_tensor(v) else sum((p[k] for p in parts), [])
        for k, v in parts[0].items()
    }


class CountingPolicy:
    """Wraps OnlineAnchors.features to count the samples the teacher is run on."""

    def __init__(self, anchors):
        self.samples = 0
        inner = anchors.features

        def features(policy, b):
            self.samples += len(b["index"])
            return inner(policy, b)

        anchors.features = features


def test_select_rows_picks_samples_and_retrims_text():
    b = batch(3, seed=0)
    b["task"] = ["a", "b", "c"]
    b["observation.language.attention_mask"] = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    b["observation.language.tokens"] = torch.tensor([[5, 6, 7], [8, 0, 0], [9, 4, 0]])
    out = select_rows(b, [2, 1])
    assert out["task"] == ["c", "b"]
    torch.testing.assert_close(out["observation.state"], b["observation.state"][[2, 1]])
    torch.testing.assert_close(out["observation.language.tokens"], torch.tensor([[9, 4], [8, 0]]))  # 3 -> 2 wide


def test_memo_targets_equal_online_and_each_frame_runs_once():
    """Memo = online on every batch (the weights have moved in between: the memo holds the
    *initial* model's targets), and the teacher runs once per frame, only on frames not met."""
    stream = [frames([0, 1, 2, 3]), frames([2, 3, 4, 5]), frames([0, 5, 1, 4])]
    cfg = dict(enabled=True, targets="actions", anchor_dataset="A", retention_weight=1.0)
    memo = CraftPlugin(
        small_policy(), CraftConfig(**cfg, anchor_source="memo"), anchor_batches=lambda s: iter(stream[s:])
    )
    online = CraftPlugin(small_policy(), CraftConfig(**cfg), anchor_batches=lambda s: iter(stream[s:]))
    counter = CountingPolicy(memo.anchors)
    train_steps(memo._policy, memo, [[batch(2, seed=s)] for s in range(3)])
    train_steps(online._policy, online, [[batch(2, seed=s)] for s in range(3)])
    assert counter.samples == 6  # frames 0..5, each once: 4 + 2 + 0
    for a, b in zip(memo.params, online.params):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)  # the same training
    with torch.no_grad():
        initial = small_policy().action_head.sample(small_policy().encode(frames([0, 5, 1, 4])))
    rows = torch.stack([memo.anchors.memo[k]["actions"] for k in (0, 5, 1, 4)])
    torch.testing.assert_close(rows, initial, atol=1e-5, rtol=1e-4)


def test_memo_keys_frames_by_source_when_there_are_several_anchor_datasets():
    """Two anchor datasets both have a frame 0: the memo keeps one entry per (source, frame),
    each the initial model's target on that frame."""
    first, second = frames([0, 1]), indexed(2, seed=77, first=0)  # same indices, other content
    first[SOURCE_KEY], second[SOURCE_KEY] = torch.tensor([0, 0]), torch.tensor([1, 1])
    cfg = CraftConfig(enabled=True, targets="actions", anchor_dataset="A,B", anchor_source="memo", retention_every=1)
    plugin = CraftPlugin(small_policy(), cfg, anchor_batches=lambda s: iter([first, second][s:]))
    train_steps(plugin._policy, plugin, [[batch(2, seed=s)] for s in range(2)])
    assert sorted(plugin.anchors.memo) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    with torch.no_grad():
        initial = small_policy().action_head.sample(small_policy().encode(second))
    rows = torch.stack([plugin.anchors.memo[(1, k)]["actions"] for k in (0, 1)])
    torch.testing.assert_close(rows, initial, atol=1e-5, rtol=1e-4)


def test_memo_needs_frame_indices_and_an_anchor_dataset():
    plugin = CraftPlugin(
        small_policy(),
        CraftConfig(enabled=True, targets="actions", anchor_dataset="A", anchor_source="memo"),
        anchor_batches=lambda s: iter([batch(2, seed=0)]),
    )
    with pytest.raises(CraftVLAError, match="index"):
        plugin.backward(plugin._policy, batch(2, seed=1))
    with pytest.raises(ConfigError, match="anchor_dataset"):
        CraftConfig(enabled=True, anchor_source="memo")
    with pytest.raises(ConfigError, match="anchor_cache"):
        CraftConfig(enabled=True, anchor_source="memo", anchor_cache="c")


def test_memo_refuses_a_flow_matching_head():
    from craftvla.config import FlowMatchingHeadConfig
    from craftvla.model.policy import VLAPolicy

    policy = VLAPolicy(dataclasses.replace(small_config(), head=FlowMatchingHeadConfig(hidden_dim=32, num_heads=2)))
    with pytest.raises(ConfigError, match="flow-matching"):
        CraftPlugin(policy, CraftConfig(enabled=True, targets="actions", anchor_dataset="A", anchor_source="memo"))


def test_fixed_frames_is_a_seeded_subset_that_keeps_indices():
    data = [{"index": i, "x": torch.tensor([float(i)])} for i in range(50)]
    a, b, c = fixed_frames(data, 8, seed=3), fixed_frames(data, 8, seed=3), fixed_frames(data, 8, seed=4)
    assert len(a) == 8 and list(a.indices) == list(b.indices) != list(c.indices)
    assert len(set(a.indices)) == 8
    assert collate([a[0], a[1]])["index"].tolist() == sorted(a.indices)[:2]
    assert fixed_frames(data, 50, seed=0) is data and fixed_frames(data, 51, seed=0) is data  # at most: all
    with pytest.raises(ConfigError, match="anchor_frames"):
        CraftConfig(enabled=True, anchor_frames=16)  # no anchor dataset to pick from


def test_retention_every_k_reuses_the_last_retention_gradient():
    """k=2: steps 0 and 2 draw an anchor batch and recompute g_ret; step 1 reuses step 0's g_ret
    and L_ret, so its final gradient is the projection of its own g_act against them."""
    stream = [indexed(3, seed=100 + i, first=3 * i) for i in range(4)]
    started = []

    def anchors(step):
        started.append(step)
        return iter(stream[step:])

    cfg = CraftConfig(enabled=True, targets="actions", anchor_dataset="A", retention_every=2, dual_lr=0.5)
    plugin = CraftPlugin(small_policy(), cfg, anchor_batches=anchors)
    drawn = []
    inner = plugin.anchors.anchor_batch
    plugin.anchors.anchor_batch = lambda *a: drawn.append(plugin.step) or inner(*a)
    policy = plugin._policy
    with torch.no_grad():  # away from the initial weights, so that g_ret is not zero at step 0
        for p in plugin.params:
            p.add_(0.05 * torch.randn_like(p))
    opt = torch.optim.SGD(plugin.params, lr=1e-2)
    seen = []
    for step in range(3):
        plugin.backward(policy, batch(2, seed=step))
        g_act, g_ret, l_ret = plugin.g_act.clone(), plugin.g_ret.clone(), plugin._l_ret.clone()
        plugin.before_optimizer_step()
        seen.append((g_ret, l_ret, plugin.lam.clone()))
        CF.project_flat(g_act, g_ret, plugin.lam, cfg.projection_eps, None, True)  # by hand: the formula
        torch.testing.assert_close(torch.cat([p.grad.flatten() for p in plugin.params]), g_act)
        opt.step()
        opt.zero_grad(set_to_none=True)
        plugin.after_optimizer_step()
    assert drawn == [0, 2] and started == [0]
    assert seen[0][0].abs().sum() > 0
    torch.testing.assert_close(seen[1][0], seen[0][0])  # g_ret kept through step 1
    assert not torch.equal(seen[2][0], seen[0][0])  # and recomputed at step 2
    torch.testing.assert_close(seen[1][1], seen[0][1])
    # the dual update of step 1 used step 0's L_ret: lambda moved by the same amount twice
    lam0, lam1, lam2 = (float(s[2]) for s in seen)
    assert lam1 - lam0 == pytest.approx(0.5 * (float(seen[0][1][0]) - cfg.retention_budget), abs=1e-6)
    assert lam2 - lam1 == pytest.approx(lam1 - lam0, abs=1e-6) and lam1 != lam0


def test_retention_every_k_recomputes_first_after_a_resume():
    """A process resumed between two refreshes has no g_ret to reuse: it recomputes at once, from
    the anchor stream positioned after the refreshes already taken (ceil(step / k))."""
    started = []

    def anchors(step):
        started.append(step)
        return iter([indexed(3, seed=100 + i, first=3 * i) for i in range(step, step + 4)])

    cfg = CraftConfig(enabled=True, targets="actions", anchor_dataset="A", retention_every=4)
    plugin = CraftPlugin(small_policy(), cfg, anchor_batches=anchors)
    plugin.step = 5  # resumed after steps 0..4: refreshes at 0 and 4 were taken
    assert plugin.retention_step
    drawn = []
    inner = plugin.anchors.anchor_batch
    plugin.anchors.anchor_batch = lambda *a: drawn.append(plugin.step) or inner(*a)
    train_steps(plugin._policy, plugin, [[batch(2, seed=0)], [batch(2, seed=1)]])
    assert started == [2] and drawn == [5]
    assert plugin.step == 7 and not plugin.retention_step  # step 7: reuse; step 8 refreshes
    plugin.step = 8
    assert plugin.retention_step
    with pytest.raises(ConfigError, match="retention_every"):
        CraftConfig(enabled=True, retention_every=0)


def test_retention_every_one_recomputes_on_every_step():
    stream = [indexed(3, seed=100 + i, first=3 * i) for i in range(3)]
    cfg = CraftConfig(enabled=True, targets="actions", anchor_dataset="A", anchor_source="online", retention_every=1)
    plugin = CraftPlugin(small_policy(), cfg, anchor_batches=lambda s: iter(stream[s:]))
    drawn = []
    inner = plugin.anchors.anchor_batch
    plugin.anchors.anchor_batch = lambda *a: drawn.append(plugin.step) or inner(*a)
    train_steps(plugin._policy, plugin, [[batch(2, seed=s)] for s in range(3)])
    assert drawn == [0, 1, 2] and plugin.anchors.memo is None


def test_defaults_of_the_fast_actions_configuration():
    """CRaFT with the actions target on an anchor dataset defaults to the measured fast
    configuration (memo on 1,024 frames, the retention gradient every 2 steps); anything else keeps
    the exact one, and each flag set by hand wins."""
    fast = CraftConfig(enabled=True, anchor_dataset="A")
    assert (fast.source, fast.frames, fast.every, fast.anchor_batch_size) == ("memo", 1024, 2, 8)
    for other in (
        CraftConfig(enabled=True, anchor_dataset="A", targets="pooled"),
        CraftConfig(enabled=True, anchor_dataset="A", targets="actions,tokens"),
        CraftConfig(enabled=True, anchor_dataset="A", mode="distill_fixed"),
        CraftConfig(enabled=True, targets="actions"),  # on the training batch
    ):
        assert (other.source, other.frames, other.every) == ("online", None, 1), other
    online = CraftConfig(enabled=True, anchor_dataset="A", anchor_source="online")
    assert (online.source, online.frames, online.every) == ("online", None, 2)
    manual = CraftConfig(enabled=True, anchor_dataset="A", anchor_frames=0, retention_every=1)
    assert (manual.source, manual.frames, manual.every) == ("memo", None, 1)
    cache = CraftConfig(enabled=True, anchor_cache="c")
    assert (cache.source, cache.every) == ("cache", 1)


def test_a_default_memo_falls_back_to_online_for_a_flow_matching_head():
    from craftvla.config import FlowMatchingHeadConfig
    from craftvla.model.policy import VLAPolicy

    policy = VLAPolicy(dataclasses.replace(small_config(), head=FlowMatchingHeadConfig(hidden_dim=32, num_heads=2)))
    plugin = CraftPlugin(policy, CraftConfig(enabled=True, anchor_dataset="A"))
    assert plugin.anchors.memo is None
