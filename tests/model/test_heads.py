"""The head interface: encode once, head.loss / head.sample; the L1 bridge head unchanged."""

import json
from pathlib import Path

import pytest
import torch

from craftvla import VLAPolicy
from craftvla.config import HeadConfig, L1BridgeHeadConfig, LLMConfig, VLAConfig
from craftvla.model.heads import HEADS, ActionHead
from craftvla.model.heads.l1_bridge import l1_loss

from .conftest import micro_config

REFERENCE = Path(__file__).parent / "fixtures/l1_bridge_reference.json"


@pytest.mark.parametrize("case", ["qwen2-bidirectional", "qwen2-causal", "bert-bidirectional"])
def test_l1_bridge_head_gives_the_same_loss_and_actions_as_before_the_rebuild(case):
    """Reference values recorded on main at 36469c4 (before the head interface and the layer loop):
    same seed, same micro config, same batch -> the same loss and actions."""
    family, attention = case.split("-")
    torch.manual_seed(0)
    llm = LLMConfig(
        family=family,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4 if family == "bert" else 2,
        intermediate_size=128,
        attention=attention,
    )
    cfg = micro_config(llm=llm, head=L1BridgeHeadConfig(hidden_dim=32))  # no flat read-out: the head as it was
    policy = VLAPolicy(cfg).eval()
    batch = cfg.fake_batch(3, seed=1)
    batch["task"] = ["open", "open the drawer slowly please", "press the button"]
    expected = json.loads(REFERENCE.read_text())[case]
    with torch.no_grad():
        loss, metrics = policy(batch)
        actions = policy.predict_action_chunk(batch)
    assert loss.item() == pytest.approx(expected["loss"], abs=1e-6)
    assert torch.allclose(actions.flatten(), torch.tensor(expected["actions"]), atol=1e-6)
    assert torch.equal(metrics["l1_loss"], loss.detach())


def test_l1_loss_hand_case():
    pred = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])  # (1, 2, 2)
    target = torch.tensor([[[0.0, 0.0], [5.0, 5.0]]])
    assert l1_loss(pred, target, torch.tensor([[False, True]])).item() == 1.5  # (1 + 2) / 2, step 2 padded
    assert l1_loss(pred, target, torch.tensor([[False, False]])).item() == 3.25  # (1 + 2 + 5 + 5) / 4


def test_encode_once_then_loss_and_sample(micro):
    policy = VLAPolicy(micro).eval()
    batch = micro.fake_batch(2)
    with torch.no_grad():
        context = policy.encode(batch)
        loss, _ = policy.action_head.loss(context, batch)
        sampled = policy.action_head.sample(context)
        full_loss, _ = policy(batch)
    assert isinstance(policy.action_head, ActionHead)
    assert sampled.shape == (2, micro.chunk_size, micro.action_dim)
    assert torch.equal(loss, full_loss)
    assert torch.equal(sampled, policy.predict_action_chunk(batch))
    assert len(context.hidden_states) == micro.llm.num_layers + 1 and torch.equal(
        context.state, batch["observation.state"]
    )


def test_head_reads_per_layer_vision_subsets_and_masks(micro):
    """After removing vision tokens the head reads each layer's survivors; masking every vision
    token of a layer equals the head not reading that layer's vision at all."""
    torch.manual_seed(0)
    cfg = micro_config(head=L1BridgeHeadConfig(hidden_dim=32, gate_init=1.0))
    policy = VLAPolicy(cfg).eval()
    batch = cfg.fake_batch(2)
    keep = lambda layer, hidden, lay: torch.tensor([[0, 3, 5], [1, 2, 7]]) if layer == 1 else None  # noqa: E731
    with torch.no_grad():
        context = policy.encode(batch, select=keep)
        assert [context.vision(i).shape[1] for i in range(3)] == [16, 16, 3]
        pruned = policy.action_head.sample(context)
        assert pruned.shape == (2, cfg.chunk_size, cfg.action_dim) and pruned.isfinite().all()
        for layout in context.layouts:
            layout.vision_mask = torch.zeros(2, layout.num_vision, dtype=torch.bool)
        blind = policy.action_head.sample(context)
        for block in policy.action_head.blocks:
            block.gate.zero_()  # tanh(0) = 0: the vision branch contributes nothing
        no_vision = policy.action_head.sample(context)
    assert torch.allclose(blind, no_vision, atol=1e-6)
    assert not torch.allclose(pruned, blind, atol=1e-4)


def test_head_type_is_a_draccus_choice():
    cfg = VLAConfig.preset("tiny")
    assert cfg.head.type == "l1_bridge" and set(HEADS) == set(HeadConfig.get_known_choices())
    encoded = cfg.to_dict()["head"]
    assert encoded["type"] == "l1_bridge"
    assert VLAConfig.from_dict(cfg.to_dict()).head == cfg.head


@pytest.mark.parametrize("flat", [0, 4])
def test_flat_readout_sees_where_a_patch_is(flat):
    """Attention pooling is blind to the order of the vision tokens; the flat read-out is not."""
    torch.manual_seed(0)
    cfg = micro_config(
        head=L1BridgeHeadConfig(hidden_dim=32, gate_init=1.0, vision_source="projector", flat_readout=flat)
    )
    policy = VLAPolicy(cfg).eval()
    with torch.no_grad():
        context = policy.encode(cfg.fake_batch(2))
        before = policy.action_head.sample(context)
        vision = context.layouts[0].vision_index
        hidden = context.hidden_states[0].clone()
        hidden[:, vision[0]] = hidden[:, vision[0].flip(0)]  # the same tokens, patches in reverse order
        context.hidden_states = (hidden, *context.hidden_states[1:])
        context.patches = context.patches.flip(1)  # the flat read-out reads the patches entering the LLM
        after = policy.action_head.sample(context)
    assert torch.allclose(before, after, atol=1e-5) == (flat == 0)
    assert (policy.action_head.flat is None) == (flat == 0)
