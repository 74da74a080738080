"""The LLM's own layer loop: equal to plain transformers, and token removal done right."""

import pytest
import torch

from craftvla.config import LLMConfig
from craftvla.model.language import LanguageBackbone, byte_tokenizer, hf_config
from craftvla.model.sequence import build_sequence

# The loop runs transformers' own modules in the same order: on CPU in float32 the states come out
# bitwise equal (asserted below). Where the sequence itself differs (removal), rounding may differ.
ATOL = 1e-5


def backbone(family: str, attention: str, attn_impl: str = "sdpa") -> LanguageBackbone:
    torch.manual_seed(0)
    cfg = LLMConfig(
        family=family,
        hidden_size=64,
        num_layers=3,
        num_heads=4,
        num_kv_heads=4 if family == "bert" else 2,
        intermediate_size=128,
        attention=attention,
    )
    config = hf_config(cfg, len(byte_tokenizer()))
    config._attn_implementation = attn_impl
    return LanguageBackbone(cfg, config, load_weights=False).eval()


def sequence(n_vis: int = 6, batch: int = 3, dim: int = 64, padded: bool = True):
    """Embeddings and layout with right-padded instructions of lengths 5, 2 and 3 (or all 5)."""
    gen = torch.Generator().manual_seed(1)
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)[:batch]
    if not padded:  # no padding anywhere: transformers' mask functions return None (kernel flags decide)
        text_mask = torch.ones_like(text_mask)
    return build_sequence(
        torch.randn(dim, generator=gen),
        torch.randn(batch, n_vis, dim, generator=gen),
        torch.randn(batch, 5, dim, generator=gen),
        text_mask,
        torch.randn(4, dim, generator=gen),
        torch.randn(dim, generator=gen),
    )


def reference(llm: LanguageBackbone, embeds, attention_mask, position_ids) -> tuple[torch.Tensor, ...]:
    kwargs = dict(
        inputs_embeds=embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        output_hidden_states=True,
        return_dict=True,
    )
    if not llm.is_encoder:
        kwargs["use_cache"] = False
    return llm.model(**kwargs).hidden_states


CASES = [
    ("qwen2", "causal"),
    ("qwen2", "bidirectional"),
    ("llama", "causal"),
    ("llama", "bidirectional"),
    ("mistral", "causal"),
    ("bert", "bidirectional"),
]


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family,attention", CASES)
def test_loop_equals_plain_transformers(family, attention, attn_impl, padded):
    llm = backbone(family, attention, attn_impl)
    embeds, layout = sequence(padded=padded)
    with torch.no_grad():
        ours = llm(embeds, layout)
        theirs = reference(llm, embeds, layout.attention_mask, layout.position_ids)
    assert len(ours.hidden_states) == len(theirs) == 4
    for a, b in zip(ours.hidden_states, theirs):
        real = layout.attention_mask.bool()  # padded positions' states are never read
        assert torch.equal(a[real], b[real]), (a - b)[real].abs().max()


@pytest.mark.parametrize("family,attention", CASES)
def test_keep_all_selection_changes_nothing(family, attention):
    llm = backbone(family, attention)
    embeds, layout = sequence()
    keep_all = lambda layer, hidden, lay: torch.arange(lay.num_vision).expand(hidden.shape[0], -1)  # noqa: E731
    with torch.no_grad():
        plain, selected = llm(embeds, layout), llm(embeds, layout, select=keep_all)
    for a, b in zip(plain.hidden_states, selected.hidden_states):
        assert torch.allclose(a, b, atol=ATOL)
    assert all(torch.equal(lay.vision_index, layout.vision_index) for lay in selected.layouts)


def test_keep_vision_by_hand():
    """Two samples, 4 vision tokens, keep 2 of them: positions, ids, masks and indices by hand."""
    embeds, layout = sequence(n_vis=4, batch=2)
    # full sequence: BOS 0 | vision 1-4 | text 5-9 | queries 10-13 | STOP 14; sample 1's text is 2 real + 3 pads
    assert layout.position_ids[1].tolist() == [0, 1, 2, 3, 4, 5, 6, 6, 6, 6, 7, 8, 9, 10, 11]
    order, kept = layout.keep_vision(torch.tensor([[2, 0], [3, 1]]))  # any order in, ascending out
    assert order.tolist() == [
        [0, 1, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
        [0, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
    ]
    assert kept.vision_index.tolist() == [[1, 2], [1, 2]]
    assert kept.text_index.tolist() == [[3, 4, 5, 6, 7]] * 2
    assert kept.query_index.tolist() == [[8, 9, 10, 11]] * 2
    assert kept.token_index.tolist() == order.tolist()
    assert kept.position_ids[0].tolist() == [0, 1, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]  # original RoPE positions
    assert kept.position_ids[1].tolist() == [0, 2, 4, 5, 6, 6, 6, 6, 7, 8, 9, 10, 11]
    assert kept.attention_mask[1].tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1]
    assert torch.equal(kept.vision(embeds[:, order[0]]), embeds[:, [1, 3]])  # sample 0's gather, by hand


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_rebuilt_mask_by_hand(attention):
    llm = backbone("qwen2", attention)
    embeds, layout = sequence(n_vis=4, batch=2)
    _, kept = layout.keep_vision(torch.tensor([[2, 0], [3, 1]]))
    mask = llm._mask(torch.zeros(2, kept.seq_len, 64), kept)  # sdpa: bool (B, 1, L', L'), True = attend
    n = kept.seq_len
    keys = kept.attention_mask.bool()[:, None, None, :].expand(2, 1, n, n)
    expected = keys & torch.ones(n, n, dtype=torch.bool).tril() if attention == "causal" else keys
    assert mask.dtype == torch.bool and torch.equal(mask, expected)


@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("family,attention", CASES)
def test_removal_before_layer_1_equals_transformers_on_the_short_sequence(family, attention, padded):
    """Dropping vision tokens before the first layer = plain transformers fed only the survivors,
    at their original position ids (checks RoPE / absolute positions and the rebuilt mask)."""
    llm = backbone(family, attention)
    embeds, layout = sequence(padded=padded)
    keep = torch.tensor([[0, 5, 2], [4, 1, 3], [5, 4, 0]])
    drop_first = lambda layer, hidden, lay: keep if layer == 0 else None  # noqa: E731
    with torch.no_grad():
        ours = llm(embeds, layout, select=drop_first)
        order, kept = layout.keep_vision(keep)
        short = torch.stack([embeds[b, order[b]] for b in range(3)])  # BERT's input layer is per token too
        theirs = reference(llm, short, kept.attention_mask, kept.position_ids)
    assert ours.hidden_states[0].shape[1] == layout.seq_len and ours.hidden_states[1].shape[1] == layout.seq_len - 3
    assert ours.layouts[0] is layout and ours.layouts[1].num_vision == 3
    real = kept.attention_mask.bool()
    for a, b in zip(ours.hidden_states[1:], theirs[1:]):
        assert torch.allclose(a[real], b[real], atol=ATOL), (a - b)[real].abs().max()


def test_removal_between_layers_shortens_later_layers_only():
    llm = backbone("qwen2", "bidirectional")
    embeds, layout = sequence()
    budgets = {1: 4, 2: 2}  # keep 4 of 6 after layer 1, then 2 of those 4 after layer 2
    select = lambda layer, hidden, lay: (  # noqa: E731
        torch.arange(budgets[layer]).expand(hidden.shape[0], -1) if layer in budgets else None
    )
    out = llm(embeds, layout, select=select)
    assert [h.shape[1] for h in out.hidden_states] == [layout.seq_len] * 2 + [layout.seq_len - 2, layout.seq_len - 4]
    assert [lay.num_vision for lay in out.layouts] == [6, 6, 4, 2]
    assert out.layouts[3].token_index[:, 1:3].tolist() == [[1, 2]] * 3  # the first two patches survived
    assert out.hidden_states[-1].isfinite().all()


def test_sequence_with_more_queries_than_vision_tokens():
    """The discrete head's slots outnumber the vision tokens (chunk x action_dim): the mask, position
    ids and index tensors still cover every token."""
    gen = torch.Generator().manual_seed(0)
    text_mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    embeds, layout = build_sequence(
        torch.randn(8, generator=gen),
        torch.randn(1, 2, 8, generator=gen),
        torch.randn(1, 3, 8, generator=gen),
        text_mask,
        torch.randn(6, 8, generator=gen),
        torch.randn(8, generator=gen),
    )
    assert embeds.shape[1] == layout.seq_len == 1 + 2 + 3 + 6 + 1
    assert layout.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0] + [1] * 7]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4, 4, 5, 6, 7, 8, 9, 10, 11]]
    assert layout.query_index.tolist() == [[6, 7, 8, 9, 10, 11]]
