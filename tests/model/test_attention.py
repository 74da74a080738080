"""Bidirectional vs causal attention, proven by perturbing a later token."""

import pytest
import torch

from craftvla import VLAPolicy
from craftvla.config import LLMConfig

from .conftest import micro_config


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_later_token_reaches_earlier_states_only_when_bidirectional(family, attention):
    torch.manual_seed(0)
    llm = LLMConfig(
        family=family,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        attention=attention,
    )
    policy = VLAPolicy(micro_config(llm=llm)).eval()
    batch = policy.config.fake_batch(1)
    context = policy.encode(batch)
    with torch.no_grad():  # perturb the action queries: the last tokens but STOP
        policy.action_queries.weight.add_(torch.randn_like(policy.action_queries.weight))
    context2 = policy.encode(batch)
    # vision tokens come before the queries
    changed = not torch.allclose(context.vision(1), context2.vision(1), atol=1e-6)
    assert changed == (attention == "bidirectional")
    assert not torch.allclose(context.queries(1), context2.queries(1))


def test_instruction_padding_is_invisible():
    """A short instruction gives the same features alone or right-padded in a batch."""
    torch.manual_seed(0)
    policy = VLAPolicy(micro_config()).eval()
    batch = policy.config.fake_batch(2)
    batch["task"] = ["open", "open the drawer slowly please"]
    full = policy.predict_action_chunk(batch)
    single = {k: (v[:1] if torch.is_tensor(v) else v[:1]) for k, v in batch.items()}
    assert torch.allclose(policy.predict_action_chunk(single), full[:1], atol=1e-5)
