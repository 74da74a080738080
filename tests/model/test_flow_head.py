"""The flow-matching head: loss by hand, Euler integration of known fields, time sampling, training."""

import math

import pytest
import torch

from craftvla import VLAPolicy
from craftvla.config import FlowMatchingHeadConfig
from craftvla.errors import ConfigError
from craftvla.model.heads.flow_matching import FlowMatchingHead, flow_loss, time_embedding

from .conftest import micro_config


@pytest.fixture
def flow():
    torch.manual_seed(0)
    cfg = micro_config(head=FlowMatchingHeadConfig(hidden_dim=32, num_steps=10))
    return VLAPolicy(cfg).eval(), cfg


def test_flow_loss_hand_case():
    v = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])
    u = torch.tensor([[[0.0, 0.0], [3.0, 3.0]]])
    assert flow_loss(v, u, torch.tensor([[False, True]])).item() == 2.5  # (1 + 4) / 2
    assert flow_loss(v, u, torch.tensor([[False, False]])).item() == 5.75  # (1 + 4 + 9 + 9) / 4


def test_loss_is_mse_to_noise_minus_actions(flow):
    policy, cfg = flow
    batch = cfg.fake_batch(3)  # sample 0 has two padded steps
    noise, t = torch.randn_like(batch["action"]), torch.tensor([0.2, 0.5, 0.9])
    with torch.no_grad():
        context = policy.encode(batch)
        loss, metrics = policy.action_head.loss(context, batch, noise=noise, t=t)
        x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * batch["action"]
        v = policy.action_head.velocity(x_t, t, policy.action_head.conditions(context))
    err = (v - (noise - batch["action"])).pow(2)
    keep = ~batch["action_is_pad"]
    assert loss.item() == pytest.approx(err[keep].mean().item(), rel=1e-6)
    assert torch.equal(metrics["flow_loss"], loss)


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_euler_on_the_exact_field_of_one_chunk_lands_on_it(flow, steps):
    """For a single data point a, the flow's velocity is v(x, t) = (x - a) / t; each Euler step scales
    x - a by (t + dt) / t, and the last (t = 1 / n) by 0, so any number of steps lands exactly on a."""
    policy, cfg = flow
    head: FlowMatchingHead = policy.action_head
    a = torch.randn(2, cfg.chunk_size, cfg.action_dim)
    calls = []
    head.velocity = lambda x, t, conds: (calls.append(t[0].item()), (x - a) / t[:, None, None])[1]
    with torch.no_grad():
        out = head.sample(policy.encode(cfg.fake_batch(2)), num_steps=steps)
    torch.testing.assert_close(out, a, rtol=0, atol=1e-5)
    assert calls == pytest.approx([1 - i / steps for i in range(steps)])


def test_euler_on_a_constant_field_and_seeded_noise(flow):
    policy, cfg = flow
    head = policy.action_head
    c = torch.randn(cfg.chunk_size, cfg.action_dim)
    head.velocity = lambda x, t, conds: c.expand_as(x)
    context = policy.encode(cfg.fake_batch(2))
    noise = torch.randn(2, cfg.chunk_size, cfg.action_dim, generator=torch.Generator().manual_seed(7))
    out = head.sample(context, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, noise - c)  # sum of dt = -1


def test_context_is_projected_once_per_chunk(flow):
    policy, cfg = flow
    head, counts = policy.action_head, {"conditions": 0}
    original = head.conditions

    def counting(context):
        counts["conditions"] += 1
        return original(context)

    head.conditions = counting
    actions = policy.predict_action_chunk(cfg.fake_batch(4))
    assert actions.shape == (4, cfg.chunk_size, cfg.action_dim) and counts["conditions"] == 1


def test_time_distribution_and_embedding(flow):
    policy, _ = flow
    torch.manual_seed(0)
    t = policy.action_head.sample_time(20000, "cpu")
    assert t.min() >= 0.001 and t.max() <= 1.0
    assert t.mean().item() == pytest.approx(0.6 * 0.999 + 0.001, abs=0.01)  # Beta(1.5, 1) mean 0.6
    emb = time_embedding(torch.tensor([0.0, 0.25]), 8)
    assert torch.equal(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    period = 4e-3 * (4.0 / 4e-3) ** (1 / 3)  # second of 4 log-spaced periods
    assert emb[1, 1].item() == pytest.approx(math.sin(2 * math.pi * 0.25 / period), abs=1e-5)


def test_context_last_reads_only_the_last_layer(flow):
    torch.manual_seed(0)
    cfg = micro_config(head=FlowMatchingHeadConfig(hidden_dim=32, context="last"))
    policy = VLAPolicy(cfg).eval()
    seen = []
    for block in policy.action_head.blocks:
        block.condition = (
            lambda orig: lambda vision, queries, *rest: (seen.append(queries), orig(vision, queries, *rest))[1]
        )(block.condition)
    context = policy.encode(cfg.fake_batch(2))
    policy.action_head.conditions(context)
    assert all(torch.equal(q, context.queries(cfg.llm.num_layers)) for q in seen) and len(seen) == cfg.llm.num_layers


def test_training_lowers_the_flow_loss(flow):
    policy, cfg = flow
    policy.train()
    batch = cfg.fake_batch(8)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
    torch.manual_seed(1)
    noise, t = torch.randn_like(batch["action"]), torch.rand(8) * 0.9 + 0.05  # a fixed draw: the loss is comparable
    losses = []
    for _ in range(30):
        loss, _ = policy.action_head.loss(policy.encode(batch), batch, noise=noise, t=t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_config_errors():
    with pytest.raises(ConfigError, match="head.context"):
        FlowMatchingHeadConfig(context="first")
    with pytest.raises(ConfigError, match="head.num_steps"):
        FlowMatchingHeadConfig(num_steps=0)


def test_save_and_load_round_trip(flow, tmp_path):
    policy, cfg = flow
    policy.save_pretrained(tmp_path / "ckpt")
    loaded = VLAPolicy.from_pretrained(tmp_path / "ckpt").eval()
    assert isinstance(loaded.action_head, FlowMatchingHead) and loaded.config.head == cfg.head
    batch = cfg.fake_batch(2)
    with torch.no_grad():
        a = policy.action_head.sample(policy.encode(batch), generator=torch.Generator().manual_seed(3))
        b = loaded.action_head.sample(loaded.encode(batch), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
