"""The discrete head: bins by hand, cross-entropy, slots = queries, the LM head's rows, training."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from craftvla import VLAPolicy
from craftvla.config import DiscreteHeadConfig, LLMConfig
from craftvla.errors import ConfigError
from craftvla.model.heads.discrete import DiscreteHead

from .conftest import micro_config


def discrete_policy(**head):
    torch.manual_seed(0)
    cfg = micro_config(head=DiscreteHeadConfig(**head))
    return VLAPolicy(cfg).eval(), cfg


def train(policy, batch, steps: int = 40) -> list[float]:
    """Adam steps on one batch; the losses."""
    policy.train()
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss, _ = policy(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_bins_by_hand():
    policy, _ = discrete_policy(num_bins=4)
    head: DiscreteHead = policy.action_head
    x = torch.tensor([-1.0, -0.4, 0.1, 0.99, 1.0, 3.0, -7.0])[:, None].expand(-1, 4)  # width 0.5 on [-1, 1]
    assert head.to_bins(x)[:, 0].tolist() == [0, 1, 2, 3, 3, 3, 0]
    assert head.from_bins(torch.tensor([[0, 1, 2, 3]])).tolist() == [[-0.75, -0.25, 0.25, 0.75]]


def test_bin_round_trip_within_half_a_bin():
    policy, _ = discrete_policy(num_bins=256)
    head = policy.action_head
    head.set_action_range(torch.tensor([-2.0, 0.0, -1.0, 5.0]), torch.tensor([2.0, 1.0, 3.0, 6.0]))
    x = head.low + torch.rand(1000, 4) * (head.high - head.low)
    err = (head.from_bins(head.to_bins(x)) - x).abs()
    assert (err <= (head.high - head.low) / 256 / 2 + 1e-6).all()


def test_slots_are_the_queries():
    _, cfg = discrete_policy()
    assert cfg.num_action_queries == cfg.chunk_size * cfg.action_dim
    assert dataclasses.replace(cfg, action_dim=7).num_action_queries == cfg.chunk_size * 7


def test_loss_is_cross_entropy_over_real_steps():
    policy, cfg = discrete_policy(num_bins=16)
    batch = cfg.fake_batch(3)  # sample 0 has two padded steps
    with torch.no_grad():
        context = policy.encode(batch)
        loss, metrics = policy.action_head.loss(context, batch)
        logits = policy.action_head.logits(context)  # (B, H, A, K)
    target = policy.action_head.to_bins(batch["action"])
    terms = F.cross_entropy(logits.permute(0, 3, 1, 2), target, reduction="none")  # (B, H, A)
    keep = ~batch["action_is_pad"]
    assert loss.item() == pytest.approx(terms[keep].mean().item(), rel=1e-6)
    assert metrics["token_accuracy"].item() == pytest.approx((logits.argmax(-1) == target)[keep].float().mean().item())
    actions = policy.predict_action_chunk(batch)
    assert actions.shape == (3, cfg.chunk_size, cfg.action_dim)
    assert torch.equal(actions, policy.action_head.from_bins(logits.argmax(-1)))


def test_set_stats_spans_the_bins_over_the_normalised_range():
    policy, cfg = discrete_policy()
    stats = {
        "observation.state": {k: np.zeros(4) for k in ("mean", "std", "min", "max")},
        "action": {"mean": np.full(4, 1.0), "std": np.full(4, 2.0), "min": np.full(4, -3.0), "max": np.full(4, 7.0)},
    }
    stats["observation.state"]["std"] = np.ones(4)
    policy.set_stats(stats, "hand")
    torch.testing.assert_close(policy.action_head.low, torch.full((4,), -2.0), atol=1e-5, rtol=0)  # (-3 - 1) / 2
    torch.testing.assert_close(policy.action_head.high, torch.full((4,), 3.0), atol=1e-5, rtol=0)  # (7 - 1) / 2


@pytest.mark.parametrize("tied", [True, False])
def test_output_layer_starts_from_the_lm_head_rows(tmp_path, tied):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from craftvla.model.language import byte_tokenizer

    vocab = len(byte_tokenizer())
    hf = Qwen2Config(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(hf)
    lm.save_pretrained(tmp_path / "llm")
    llm = LLMConfig(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        weights_dir=str(tmp_path / "llm"),
        tokenizer="bytes",
    )
    policy = VLAPolicy(micro_config(llm=llm, head=DiscreteHeadConfig(num_bins=256)))
    expected = (lm.get_input_embeddings() if tied else lm.lm_head).weight[vocab - 256 :]
    assert torch.equal(policy.action_head.out.weight, expected.detach())


def test_training_lowers_the_cross_entropy_and_bins_save(tmp_path):
    policy, cfg = discrete_policy(num_bins=32)
    batch = cfg.fake_batch(8)
    losses = train(policy, batch)
    assert losses[-1] < 0.5 * losses[0]
    policy.action_head.set_action_range(torch.full((4,), -0.5), torch.full((4,), 0.5))
    policy.eval().save_pretrained(tmp_path / "ckpt")
    loaded = VLAPolicy.from_pretrained(tmp_path / "ckpt").eval()
    assert torch.equal(loaded.action_head.low, policy.action_head.low)
    assert torch.equal(loaded.predict_action_chunk(batch), policy.predict_action_chunk(batch))


def test_target_actions_are_the_expected_bin_centre():
    policy, cfg = discrete_policy(num_bins=8)
    with torch.no_grad():
        context = policy.encode(cfg.fake_batch(2))
        probs = policy.action_head.logits(context).softmax(-1)  # (B, H, A, K)
        expected = (probs * policy.action_head.from_bins(torch.arange(8)[:, None].expand(-1, 4)).T[None, None]).sum(-1)
        torch.testing.assert_close(policy.action_head.target_actions(context), expected)


def causal_discrete_policy(num_bins: int = 16):
    torch.manual_seed(0)
    llm = LLMConfig(
        hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, attention="causal"
    )
    cfg = micro_config(head=DiscreteHeadConfig(num_bins=num_bins), llm=llm)
    return VLAPolicy(cfg).eval(), cfg


def test_decoding_follows_the_attention_mode():
    _, cfg = causal_discrete_policy()
    assert cfg.head.decoding == "autoregressive"
    _, cfg = discrete_policy()
    assert cfg.head.decoding == "parallel"
    with pytest.raises(ConfigError, match="head.decoding"):
        micro_config(head=DiscreteHeadConfig(decoding="autoregressive"))


def test_kv_cache_decoding_equals_full_recomputation():
    """Greedy slot-by-slot decoding with the cache gives the logits one causal pass over the whole
    sequence gives when its slots are fed the same bins (teacher forcing): padded instructions included."""
    policy, cfg = causal_discrete_policy()
    batch = cfg.fake_batch(3)
    batch["task"] = ["open", "press the button from the top", "close the drawer"]  # different lengths: padding
    bins, step_logits = policy.decode_autoregressive(batch)
    assert bins.shape == (3, cfg.chunk_size, cfg.action_dim)
    forced = {**batch, "action": policy.action_head.from_bins(bins)}
    assert torch.equal(policy.action_head.to_bins(forced["action"]), bins)
    with torch.no_grad():
        full = policy.action_head.logits(policy.encode(forced))  # (B, H, A, K), one pass
    torch.testing.assert_close(step_logits, full, rtol=0, atol=1e-5)
    assert torch.equal(policy.predict_action_chunk(batch), policy.action_head.from_bins(bins))


def test_autoregressive_training_is_teacher_forced():
    policy, cfg = causal_discrete_policy(num_bins=32)
    losses = train(policy, cfg.fake_batch(8))
    assert losses[-1] < 0.5 * losses[0]
    assert policy.action_head.token_in.weight.grad is not None  # the previous bins feed the slots
