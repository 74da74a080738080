"""Token mergers: window grouping, pooling, the learned mergers' start and sparsity, ToMe."""

import math

import pytest
import torch

from craftvla.errors import ConfigError
from craftvla.prune.merger import (
    LearnableTokenMerger,
    LearnableTokenMergerV2,
    PoolMerger,
    ToMeMerger,
    ToMeSetMerger,
    WindowScoreMerger,
    group_matrix,
    normalised_entropy,
    patch_groups,
)


def test_patch_groups_by_hand():
    # 4x4 grid, raster order: 1x2 windows at 0.5, 2x2 at 0.25, 2x4 at 0.125.
    assert patch_groups(1, 4, 0.5).view(4, 4).tolist() == [[0, 0, 1, 1], [2, 2, 3, 3], [4, 4, 5, 5], [6, 6, 7, 7]]
    assert patch_groups(1, 4, 0.25).view(4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    assert patch_groups(1, 4, 0.125).view(4, 4).tolist() == [[0] * 4, [0] * 4, [1] * 4, [1] * 4]
    two = patch_groups(2, 4, 0.25)  # the second camera's windows follow the first's
    assert two[:16].max() == 3 and two[16:].min() == 4 and two[16:].max() == 7
    with pytest.raises(ConfigError, match="power of two"):
        patch_groups(1, 4, 0.3)
    with pytest.raises(ConfigError, match="tile"):
        patch_groups(1, 6, 0.125)


def test_pool_merger_averages_windows():
    x = torch.arange(2 * 16 * 3, dtype=torch.float32).view(2, 16, 3)
    out, _, _ = PoolMerger(patch_groups(1, 4, 0.25))(x, None, None)
    assert out.shape == (2, 4, 3)
    assert torch.allclose(out[:, 0], (x[:, 0] + x[:, 1] + x[:, 4] + x[:, 5]) / 4)
    assert torch.allclose(out[:, 3], (x[:, 10] + x[:, 11] + x[:, 14] + x[:, 15]) / 4)
    assert torch.allclose(group_matrix(patch_groups(1, 4, 0.5)).sum(1), torch.ones(8))


def test_learned_mergers_start_near_pooling_and_v2_is_v1_at_init():
    torch.manual_seed(0)
    groups = patch_groups(1, 8, 0.5)
    x, text, mask = torch.randn(2, 64, 16), torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    pooled, _, _ = PoolMerger(groups)(x, text, mask)
    v1 = LearnableTokenMerger(16, groups, hidden_dim=8)
    torch.manual_seed(1)
    v2 = LearnableTokenMergerV2(16, groups, hidden_dim=8)
    v2.load_state_dict({**v2.state_dict(), **v1.state_dict()})
    out1, _, stats = v1(x, text, mask)
    out2, _, _ = v2(x, text, mask)
    assert torch.equal(out1, out2)  # the instruction branch starts at zero
    # Each output's weight outside its window starts at 62 e^-8 / (2 + 62 e^-8) ~ 1%.
    leak = 62 * math.exp(-8) / (2 + 62 * math.exp(-8))
    assert (out1 - pooled).abs().max() < 3 * leak * x.abs().max()
    assert 0.0 < float(stats["merge_sparsity"].detach()) < 0.25


def test_merge_sparsity_extremes():
    assert float(normalised_entropy(torch.eye(4))) == pytest.approx(0.0)
    assert float(normalised_entropy(torch.full((3, 8), 1 / 8))) == pytest.approx(1.0)


def test_sparsity_loss_and_task_gradients_reach_the_merger():
    torch.manual_seed(0)
    merger = LearnableTokenMergerV2(16, patch_groups(1, 4, 0.5), hidden_dim=8)
    x, text, mask = torch.randn(2, 16, 16), torch.randn(2, 3, 16), torch.ones(2, 3, dtype=torch.bool)
    out, _, stats = merger(x, text, mask)
    (out.pow(2).mean() + stats["merge_sparsity"]).backward()
    assert merger.prior.grad.abs().sum() > 0 and merger.queries.grad.abs().sum() > 0
    assert merger.text_to_slots.weight.grad.abs().sum() > 0


def test_tome_merges_the_most_similar_pairs():
    # 8 tokens; A = even positions, B = odd. A0 duplicates B0 and A1 duplicates B1: merging 2 pairs
    # must fold exactly those, leaving B0 and B1 unchanged (averages of equal tokens).
    torch.manual_seed(0)
    x = torch.randn(1, 8, 6)
    x[0, 0], x[0, 2] = x[0, 1], x[0, 3]
    out, _, _ = ToMeMerger(6)(x, None, None)
    assert out.shape == (1, 6, 6)
    assert torch.allclose(out[0, :2], x[0, [4, 6]])  # the kept A tokens, in order
    assert torch.allclose(out[0, 2:], x[0, [1, 3, 5, 7]])


@pytest.mark.parametrize("num_out", [31, 16, 5, 1])
def test_tome_sources_name_the_inputs_each_merged_token_averages(num_out):
    torch.manual_seed(0)
    x = torch.randn(3, 32, 4)
    out, sources, _ = ToMeMerger(num_out)(x, None, None)  # (3, M, 4), (3, 32, M)
    assert sources.shape == (3, 32, num_out) and torch.equal(sources.sum(-1), torch.ones(3, 32))
    for b in range(3):
        slot = sources[b].argmax(-1)  # (32,)
        for m in range(num_out):  # sizes count original tokens: each merged token is its inputs' mean
            assert torch.allclose(out[b, m], x[b, slot == m].mean(0), atol=1e-5)
    assert torch.allclose(sources @ out, out.gather(1, sources.argmax(-1, keepdim=True).expand(-1, -1, 4)))


def test_window_and_learned_sources_spread_each_merged_token_over_its_inputs():
    torch.manual_seed(0)
    groups = patch_groups(1, 4, 0.25)
    x, text, mask = torch.randn(2, 16, 8), torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool)
    pooled, sources, _ = PoolMerger(groups)(x, text, mask)
    assert torch.equal(sources @ pooled, pooled[:, groups])
    merger = LearnableTokenMergerV2(8, groups, hidden_dim=4, spread=30.0)  # prior ~ hard windows
    merged, soft, _ = merger(x, text, mask)
    assert torch.allclose(soft.sum(-1), torch.ones(2, 16)) and torch.allclose(soft, sources.expand(2, -1, -1))
    with torch.no_grad():
        merger.prior.zero_()  # every slot averages every input: each input's stand-in is the slots' mean
        merged, soft, _ = merger(x, text, mask)
    assert torch.allclose(soft @ merged, merged.mean(1, keepdim=True).expand(-1, 16, -1), atol=1e-6)


def test_tome_size_weighted_average():
    x = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]]])  # A: rows 0, 2; B: rows 1, 3
    out, _, _ = ToMeMerger(1)(x, None, None)  # 4 -> 2 -> 1: every token averaged, each counted once
    assert torch.allclose(out[0, 0], x[0].mean(0), atol=1e-6)


def test_window_score_merger_starts_as_pooling_and_weights_each_window_by_its_scores():
    torch.manual_seed(0)
    groups = patch_groups(2, 4, 0.25)  # two cameras of 4x4 patches -> 8 windows of 4
    merger = WindowScoreMerger(dim=4, groups=groups, hidden_dim=4)
    vision, text, mask = torch.randn(3, 32, 4), torch.randn(3, 5, 4), torch.ones(3, 5, dtype=torch.bool)
    merged, _, stats = merger(vision, text, mask)
    pooled, _, _ = PoolMerger(groups)(vision, text, mask)
    assert torch.allclose(merged, pooled, atol=1e-6) and stats["merge_sparsity"].item() == pytest.approx(1.0)
    with torch.no_grad():  # s_n = tanh(x_n[0]): the instruction plays no part
        merger.scores.vision.weight.copy_(torch.eye(4))
        merger.scores.vision.bias.zero_()
        merger.scores.text.weight.zero_()
        merger.scores.score.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    merged, _, _ = merger(vision, text, mask)
    for m in range(8):  # by hand: each window's own softmax
        members = (groups == m).nonzero().squeeze(1)
        w = torch.tanh(vision[:, members, 0]).softmax(dim=1)  # (3, 4)
        assert torch.allclose(merged[:, m], (w.unsqueeze(-1) * vision[:, members]).sum(1), atol=1e-6)
    with pytest.raises(ConfigError, match="equal windows"):
        WindowScoreMerger(4, torch.tensor([0, 0, 1]))


@pytest.mark.parametrize(
    "make",
    [
        lambda: WindowScoreMerger(dim=8, groups=patch_groups(1, 4, 0.5), hidden_dim=6),
        lambda: ToMeSetMerger(dim=8, num_out=4, hidden_dim=6),
    ],
    ids=["window_scores", "tome_sets"],
)
def test_score_mergers_learn_from_zero_and_read_the_instruction(make):
    torch.manual_seed(0)
    merger = make()
    vision, mask = torch.randn(2, 16, 8), torch.ones(2, 3, dtype=torch.bool)
    merged, _, _ = merger(vision, torch.randn(2, 3, 8), mask)
    merged.pow(2).sum().backward()
    assert merger.scores.score.weight.grad.abs().sum() > 0  # zero-initialised, yet it learns
    with torch.no_grad():
        merger.scores.score.weight.normal_()
    a, _, _ = merger(vision, torch.randn(2, 3, 8), mask)
    b, _, _ = merger(vision, torch.randn(2, 3, 8), mask)
    assert not torch.allclose(a, b)  # another instruction, other weights


def test_tome_set_merger_starts_as_tome_and_weights_each_set_by_its_scores():
    torch.manual_seed(0)
    vision, text, mask = torch.randn(3, 32, 4), torch.randn(3, 5, 4), torch.ones(3, 5, dtype=torch.bool)
    merger = ToMeSetMerger(dim=4, num_out=6, hidden_dim=4)
    merged, sources, stats = merger(vision, text, mask)
    tome, tome_sources, _ = ToMeMerger(6)(vision, None, None)
    assert torch.equal(sources, tome_sources) and torch.allclose(merged, tome, atol=1e-6)
    assert stats["merge_sparsity"].item() == pytest.approx(1.0)  # each set's plain mean
    with torch.no_grad():  # s_n = tanh(x_n[0]): the instruction plays no part
        merger.scores.vision.weight.copy_(torch.eye(4))
        merger.scores.vision.bias.zero_()
        merger.scores.text.weight.zero_()
        merger.scores.score.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    merged, sources, stats = merger(vision, text, mask)
    assert torch.equal(sources, tome_sources)  # ToMe still decides the sets
    for b in range(3):  # by hand: each set's own softmax over its members
        for m in range(6):
            members = sources[b, :, m].nonzero().squeeze(1)
            w = torch.tanh(vision[b, members, 0]).softmax(dim=0)
            assert torch.allclose(merged[b, m], (w.unsqueeze(-1) * vision[b, members]).sum(0), atol=1e-6)
    assert 0.0 < stats["merge_sparsity"].item() < 1.0


def test_set_sparsity_by_hand():
    from craftvla.prune.merger import set_sparsity

    members = torch.tensor([[[1.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]]])
    weights = torch.tensor([[[0.5, 0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]]])
    # set 0 uniform (1), set 1 one-hot (0); set 2 has one member and does not count
    assert set_sparsity(weights, members).item() == pytest.approx(0.5)
    assert set_sparsity(weights[:, 2:], members[:, 2:]).item() == 0.0  # only single members: nothing to weigh
