import dataclasses

import pytest
import torch

from craftvla import VLAConfig
from craftvla.config import LLMConfig, VisionConfig


def micro_config(**overrides) -> VLAConfig:
    """The tiny preset shrunk further so shape tests run in milliseconds."""
    vision = overrides.pop(
        "vision", VisionConfig(backbone_id="tiny-vit", image_size=32, patch_size=8, width=32, depth=2, num_heads=2)
    )
    llm = overrides.pop(
        "llm", LLMConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
    )
    cfg = VLAConfig.preset("tiny")
    cfg = dataclasses.replace(cfg, vision=vision, llm=llm, **overrides)
    cfg.head.hidden_dim = 32
    return cfg


@pytest.fixture
def micro():
    torch.manual_seed(0)
    return micro_config()
