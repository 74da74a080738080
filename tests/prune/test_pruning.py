"""Pruning inside the policy: hard removal, soft masks, their agreement, baselines, save/load."""

import pytest
import torch
import torch.nn.functional as F

from craftvla.config import PruningConfig, VLAConfig
from craftvla.errors import ConfigError, CraftVLAError
from craftvla.model.language import keep_attention
from craftvla.model.policy import VLAPolicy
from craftvla.prune.module import apply_pruning


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = VLAConfig.preset("tiny")
    return VLAPolicy(cfg).eval(), cfg.fake_batch(3)


def _pruned(policy, **kw):
    torch.manual_seed(1)
    return apply_pruning(policy, PruningConfig(**kw)).eval()


def test_keep_all_budget_equals_the_unpruned_model_exactly(tiny):
    policy, batch = tiny
    apply_pruning(policy, PruningConfig())
    reference = policy.predict_action_chunk(batch)
    _pruned(policy, scorer="attention", layers=[1, 2], keep=[1.0, 1.0])
    assert torch.equal(policy.predict_action_chunk(batch), reference)
    policy.pruning.set_soft(True, 0.5, noise=False)
    assert torch.allclose(policy.predict_action_chunk(batch), reference, atol=1e-6)  # SDPA vs keep_attention rounding


def test_hard_removes_tokens_and_keeps_position_ids(tiny):
    policy, batch = tiny
    _pruned(policy, scorer="mlp", layers=[1, 3], keep=[0.5, 0.25])
    ctx = policy.encode(batch)
    full = ctx.layouts[0]
    assert [h.shape[1] for h in ctx.hidden_states] == [full.seq_len] * 2 + [full.seq_len - 32] * 2 + [full.seq_len - 48]
    assert [lay.num_vision for lay in ctx.layouts] == [64, 64, 32, 32, 16]
    for lay in ctx.layouts[2:]:
        # survivors keep their original positions: position id = original index = token_index here (no padding before them)
        assert torch.equal(
            lay.position_ids.gather(1, lay.vision_index),
            full.position_ids.gather(1, lay.token_index.gather(1, lay.vision_index)),
        )
        assert torch.equal(lay.token_index.gather(1, lay.query_index), full.query_index)
        assert (lay.token_index.diff(dim=1) > 0).all()  # original order kept
    later = set(ctx.layouts[4].token_index.gather(1, ctx.layouts[4].vision_index)[0].tolist())
    assert later <= set(ctx.layouts[2].token_index.gather(1, ctx.layouts[2].vision_index)[0].tolist())
    assert float(ctx.pruning["keep/3"]) == 0.25 and float(ctx.pruning["tokens/1"]) == 32


def test_soft_without_noise_computes_what_hard_computes(tiny):
    policy, batch = tiny
    _pruned(policy, merger="learned_v2", scorer="attention", layers=[1, 2], keep=[0.5, 0.25])
    hard = policy.encode(batch)
    actions_hard = policy.action_head.sample(hard)
    policy.pruning.set_soft(True, 0.3, noise=False)
    soft = policy.encode(batch)
    assert torch.allclose(policy.action_head.sample(soft), actions_hard, atol=1e-5)
    lay = soft.layouts[4]  # soft: the full sequence, the survivors' states equal the hard model's
    kept = lay.vision_mask
    assert int(kept.sum(1)[0]) == 8 and soft.hidden_states[4].shape[1] == hard.layouts[0].seq_len
    soft_kept = lay.vision(soft.hidden_states[4])[kept].view(3, 8, -1)
    assert torch.allclose(soft_kept, hard.vision(4), atol=1e-5)
    assert torch.allclose(soft.queries(4), hard.queries(4), atol=1e-5)


def test_disabling_parts_gives_the_merged_or_the_original_policy(tiny):
    policy, batch = tiny
    apply_pruning(policy, PruningConfig())
    original = policy.encode(batch)
    _pruned(policy, merger="pool", merge_ratio=0.5)
    merged_only = policy.encode(batch)
    _pruned(policy, merger="pool", merge_ratio=0.5, scorer="mlp", layers=[1, 2], keep=[0.5, 0.25])
    with policy.pruning.disabled(("pruner",)):  # stage 2's reference: merged, nothing selected
        ctx = policy.encode(batch)
    assert [lay.num_vision for lay in ctx.layouts] == [32] * 5
    assert torch.equal(ctx.hidden_states[-1], merged_only.hidden_states[-1])
    with policy.pruning.disabled():
        ctx = policy.encode(batch)
    assert [lay.num_vision for lay in ctx.layouts] == [64] * 5
    assert torch.equal(ctx.hidden_states[-1], original.hidden_states[-1])
    assert [lay.num_vision for lay in policy.encode(batch).layouts] == [32, 32, 16, 8, 8]
    with pytest.raises(ValueError, match="unknown parts"):
        with policy.pruning.disabled(("pruners",)):
            pass


@pytest.mark.parametrize("scorer", ["instruction", "fastv"])
def test_attention_scorers_ignore_masked_out_tokens(tiny, scorer):
    policy, batch = tiny
    _pruned(policy, scorer=scorer, layers=[1, 2], keep=[0.5, 0.25])
    hard = policy.encode(batch)
    policy.pruning.set_soft(True, 0.3, noise=False)
    soft = policy.encode(batch)
    policy.pruning.set_soft(False)
    score = policy.pruning.pruner.scorer
    kept = soft.layouts[2].vision_mask  # (B, 64): the 32 survivors of layer 1's selection
    soft_scores = score(soft.hidden_states[2], soft.layouts[2], 2)[kept].view(3, 32)
    assert torch.allclose(soft_scores, score(hard.hidden_states[2], hard.layouts[2], 2), atol=1e-5)


def test_soft_training_step_reaches_pruner_heads(tiny):
    policy, batch = tiny
    _pruned(policy, scorer="attention", layers=[1, 2], keep=[0.5, 0.25]).train()
    policy.pruning.set_soft(True, 1.0)
    loss, _ = policy(batch)
    loss.backward()
    for head in policy.pruning.pruner.heads.values():
        norm = torch.cat([p.grad.flatten() for p in head.parameters() if p.grad is not None]).norm()
        assert 0 < norm < 100  # reaches the heads; bounded (a hard mask's own gradient reached 1e13 here)
    policy.zero_grad(set_to_none=True)
    policy.eval()


def test_keep_attention_zero_weight_equals_removing_the_key():
    torch.manual_seed(0)
    module = torch.nn.Module()
    q, k, v = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)  # 4 heads, 2 kv heads
    keep = torch.ones(2, 7)
    keep[:, [2, 5]] = 0.0
    out, _ = keep_attention(module, q, k, v, None, scaling=8**-0.5, key_keep=keep, is_causal=False)
    rest = [0, 1, 3, 4, 6]
    kr, vr = k[:, :, rest].repeat_interleave(2, 1), v[:, :, rest].repeat_interleave(2, 1)
    ref = F.scaled_dot_product_attention(q[:, :, rest], kr, vr).transpose(1, 2)
    assert torch.allclose(out[:, rest], ref, atol=1e-6)
    # relaxed weights: the forward value is the hard mask's, the weights' gradient that of the relaxed softmax
    soft = torch.rand(2, 7, requires_grad=True)
    mixed, _ = keep_attention(
        module, q, k, v, None, scaling=8**-0.5, key_keep=keep, key_keep_soft=soft, is_causal=False
    )
    assert torch.allclose(mixed, out, atol=1e-6)
    mixed.pow(2).sum().backward()
    soft_ref = soft.detach().clone().requires_grad_(True)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    weight = torch.where(torch.eye(7, dtype=torch.bool), 1.0, soft_ref[:, None, None, :])  # by hand: w_j exp(s_ij)
    p = (q @ kk.transpose(2, 3) * 8**-0.5).exp() * weight
    relaxed = ((p / p.sum(-1, keepdim=True)) @ vv).transpose(1, 2)
    (relaxed * 2 * out.detach()).sum().backward()  # d(sum y^2)/dy taken at the forward (hard) value
    assert torch.allclose(soft.grad, soft_ref.grad, atol=1e-5)
    ones, _ = keep_attention(module, q, k, v, None, scaling=8**-0.5, key_keep=torch.ones(2, 7), is_causal=True)
    causal = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    assert torch.allclose(ones, causal.transpose(1, 2), atol=1e-6)


def test_fastv_scores_are_the_attention_transformers_computes(tiny):
    policy, batch = tiny
    _pruned(policy, scorer="fastv", layers=[2], keep=[0.5])
    ctx = policy.encode(batch)
    layer = 2
    hidden, layout = ctx.hidden_states[layer], ctx.layouts[layer]
    # Independent: transformers' eager attention on the same layer returns its attention weights.
    llm = policy.llm.model
    attn = llm.layers[layer].self_attn
    saved = llm.config._attn_implementation
    llm.config._attn_implementation = "eager"
    try:
        mask = policy.llm._mask(hidden, layout)
        _, weights = attn(
            llm.layers[layer].input_layernorm(hidden),
            position_embeddings=policy.llm._rope(hidden, layout),
            attention_mask=mask,
        )
    finally:
        llm.config._attn_implementation = saved
    last = layout.last_token_index()
    expected = weights.mean(1)[torch.arange(3), last].gather(1, layout.vision_index)  # (B, N_vis)
    scores = policy.pruning.pruner.scores(layer, hidden, layout)
    assert torch.allclose(scores, expected, atol=1e-6)
    kept = ctx.layouts[3].token_index.gather(1, ctx.layouts[3].vision_index)
    top = layout.vision_index.gather(1, expected.topk(32, dim=1).indices).sort(1).values
    assert torch.equal(kept, top)


def test_every_method_runs_and_saves(tiny, tmp_path):
    policy, batch = tiny
    for merger, scorer in [("pool", "random"), ("tome", "instruction"), ("learned", "mlp"), ("none", "fastv")]:
        _pruned(policy, merger=merger, scorer=scorer)
        torch.manual_seed(3)
        actions = policy.predict_action_chunk(batch)
        out = tmp_path / f"{merger}-{scorer}"
        policy.save_pretrained(out)
        loaded = VLAPolicy.from_pretrained(out).eval()
        assert loaded.config.pruning == policy.config.pruning
        torch.manual_seed(3)
        assert torch.equal(loaded.predict_action_chunk(batch), actions)


def test_unpruned_checkpoints_and_bad_configs():
    with pytest.raises(ConfigError, match="pruning.keep"):
        PruningConfig(scorer="mlp", keep=[0.25, 0.5])
    with pytest.raises(ConfigError, match="pruning.merger"):
        PruningConfig(merger="kmeans")
    with pytest.raises(ConfigError, match="pruning.layers"):
        PruningConfig(scorer="mlp", layers=[0, 4]).schedule(4)
    with pytest.raises(ConfigError, match="one value per layer"):
        PruningConfig(scorer="mlp", layers=[1, 2], keep=[0.5]).schedule(4)
    assert PruningConfig(scorer="mlp").schedule(4) == [(1, 0.5), (2, 0.25)]
    assert PruningConfig(scorer="mlp").schedule(24) == [(6, 0.5), (12, 0.25)]
    assert PruningConfig().schedule(4) == [] and not PruningConfig().enabled


def test_soft_masks_need_keep_attention():
    torch.manual_seed(0)
    cfg = VLAConfig.preset("tiny")
    policy = VLAPolicy(cfg).eval()

    def soft(layer, hidden, layout):
        return torch.ones(layout.vision_index.shape) if layer == 1 else None

    with pytest.raises(CraftVLAError, match="keep_attention"):
        policy.encode(cfg.fake_batch(2), select=soft)
