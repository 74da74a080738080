"""CRaFT with every action head: its retention targets come from the VLM context (and, for
`actions`, from the head's own chunk with its noise drawn the same way for the start and now)."""

import dataclasses

import pytest
import torch

from craftvla.config import DiscreteHeadConfig, FlowMatchingHeadConfig, L1BridgeHeadConfig, VLAAdapterHeadConfig
from craftvla.craft.config import CraftConfig
from craftvla.craft.plugin import CraftPlugin
from craftvla.model.policy import VLAPolicy

from ._common import batch, small_config, train_steps

HEADS = {
    "l1_bridge": L1BridgeHeadConfig(hidden_dim=32, num_heads=2),
    "flow_matching": FlowMatchingHeadConfig(hidden_dim=32, num_heads=2, num_steps=4),
    "discrete": DiscreteHeadConfig(num_bins=32),  # actions target: the expected bin centre
    "vla_adapter": VLAAdapterHeadConfig(pro=True),  # actions target: its chunk without the training noise
}


@pytest.mark.parametrize("head", list(HEADS))
def test_craft_retains_with_every_head(head):
    torch.manual_seed(0)
    policy = VLAPolicy(dataclasses.replace(small_config(), head=HEADS[head]))
    plugin = CraftPlugin(policy, CraftConfig(enabled=True, targets="pooled,tokens,actions", dual_lr=0.0, log_freq=1))
    b = batch(4, seed=1)
    out = policy.compute_loss(b)
    pairs = plugin.anchors.retention_pairs(policy, b, out.context)
    for name, (f, f0) in pairs.items():  # before any update the policy is its own anchor, noise included
        torch.testing.assert_close(f, f0, rtol=0, atol=1e-6, msg=name)
    logs = train_steps(policy, plugin, [[batch(4, seed=s)] for s in range(3)], lr=0.05)
    assert logs[0]["craft/ret/actions"] == pytest.approx(0.0, abs=1e-8)
    assert all(torch.isfinite(torch.tensor(float(v))) for log in logs for v in log.values())
    assert (
        logs[-1]["craft/ret/actions"] > 0 and logs[-1]["craft/ret/pooled"] > 0 and logs[-1]["craft/ret/tokens"] > 0
    )  # the weights moved; it is measured
