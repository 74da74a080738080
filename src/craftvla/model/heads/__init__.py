"""Action heads behind one interface (`base.ActionHead`), one module per head type; the head's
config class (`craftvla.config.HeadConfig` subclasses) picks the class through `HEADS`."""

from __future__ import annotations

from craftvla.config import VLAConfig
from craftvla.model.heads.base import ActionHead
from craftvla.model.heads.discrete import DiscreteHead
from craftvla.model.heads.flow_matching import FlowMatchingHead
from craftvla.model.heads.l1_bridge import L1BridgeHead
from craftvla.model.heads.vla_adapter import VLAAdapterHead

HEADS: dict[str, type[ActionHead]] = {
    "l1_bridge": L1BridgeHead,
    "flow_matching": FlowMatchingHead,
    "discrete": DiscreteHead,
    "vla_adapter": VLAAdapterHead,
}


def build_head(config: VLAConfig, llm_dim: int, num_layers: int, num_vision_tokens: int) -> ActionHead:
    """The head named by `config.head.type`, sized for the LLM (width, layers, vision tokens entering
    it) and the policy's state / action / chunk."""
    return HEADS[config.head.type](
        config.head,
        llm_dim=llm_dim,
        num_layers=num_layers,
        state_dim=config.state_dim,
        action_dim=config.action_dim,
        chunk_size=config.chunk_size,
        num_vision_tokens=num_vision_tokens,
    )


__all__ = ["HEADS", "ActionHead", "DiscreteHead", "FlowMatchingHead", "L1BridgeHead", "VLAAdapterHead", "build_head"]
