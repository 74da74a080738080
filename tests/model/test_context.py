"""The one bridge-feature function: pooling and layer/anchor selection on a hand-built context."""

import pytest
import torch

from craftvla.errors import ConfigError
from craftvla.model.context import VLMContext, bridge_features, default_anchor_layer, pool_tokens
from craftvla.model.sequence import TokenLayout


def test_pool_tokens_hand_case():
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, -6.0]]])  # (1, 3, 2)
    mask = torch.tensor([[True, True, False]])
    assert torch.equal(pool_tokens(h, None, "mean"), torch.tensor([[3.0, 0.0]]))
    assert torch.equal(pool_tokens(h, None, "max"), torch.tensor([[5.0, 4.0]]))
    assert torch.equal(pool_tokens(h, mask, "mean"), torch.tensor([[2.0, 3.0]]))
    assert torch.equal(pool_tokens(h, mask, "max"), torch.tensor([[3.0, 4.0]]))
    empty = torch.zeros(1, 3, dtype=torch.bool)
    assert torch.equal(pool_tokens(h, empty, "max"), torch.zeros(1, 2))
    assert torch.equal(pool_tokens(h, empty, "mean"), torch.zeros(1, 2))
    with pytest.raises(ConfigError, match="pooling"):
        pool_tokens(h, None, "median")


def _layout(vision: list[int], query: list[int], length: int, vision_mask=None) -> TokenLayout:
    row = lambda values: torch.tensor([values])  # noqa: E731  (B = 1)
    return TokenLayout(
        vision_index=row(vision),
        text_index=row([]).long(),
        text_mask=row([]).bool(),
        query_index=row(query),
        attention_mask=torch.ones(1, length, dtype=torch.long),
        position_ids=row(list(range(length))),
        token_index=row(list(range(length))),
        vision_mask=vision_mask,
    )


def test_bridge_features_reads_the_anchor_layer_vision_and_last_layer_queries():
    # 3 hidden states (2 layers); layer 1 is the default anchor layer (2 // 2); layer 2 lost a token.
    h0 = torch.zeros(1, 4, 2)
    h1 = torch.tensor([[[9.0, 9.0], [1.0, 1.0], [3.0, 5.0], [7.0, 8.0]]])  # vision at 1, 2; query at 3
    h2 = torch.tensor([[[0.0, 0.0], [4.0, 4.0], [6.0, 2.0]]])  # vision at 1; query at 2
    lay = _layout([1, 2], [3], 4)
    ctx = VLMContext((h0, h1, h2), (lay, lay, _layout([1], [2], 3)), torch.zeros(1, 4))
    assert default_anchor_layer(2) == 1
    assert torch.equal(bridge_features(ctx), torch.tensor([[2.0, 3.0, 6.0, 2.0]]))  # mean C_R (layer 1), C_AQ (last)
    assert torch.equal(bridge_features(ctx, layer=2, anchor_type="vision"), torch.tensor([[4.0, 4.0]]))
    assert torch.equal(bridge_features(ctx, anchor_type="action_query"), torch.tensor([[6.0, 2.0]]))
    assert torch.equal(bridge_features(ctx, pooling="max", anchor_type="vision"), torch.tensor([[3.0, 5.0]]))
    with pytest.raises(ConfigError, match="anchor_type"):
        bridge_features(ctx, anchor_type="text")


def test_bridge_features_leave_masked_vision_tokens_out():
    h = torch.tensor([[[9.0, 9.0], [1.0, 1.0], [3.0, 5.0], [7.0, 8.0]]])
    lay = _layout([1, 2], [3], 4, vision_mask=torch.tensor([[False, True]]))
    ctx = VLMContext((h, h, h), (lay, lay, lay), torch.zeros(1, 4))
    assert torch.equal(bridge_features(ctx, anchor_type="vision"), torch.tensor([[3.0, 5.0]]))
