"""A forward pass prints no deprecation warnings (a FutureWarning per forward broke every progress bar)."""

import dataclasses
import warnings

import pytest

from craftvla import VLAConfig, VLAPolicy
from craftvla.config import DiscreteHeadConfig


@pytest.mark.parametrize("attention, head", [("bidirectional", None), ("causal", None), ("causal", "discrete")])
def test_training_and_inference_forwards_raise_no_future_warning(attention, head):
    cfg = VLAConfig.preset("tiny")
    cfg.llm.attention = attention
    if head == "discrete":  # decodes slot by slot with a KV cache
        cfg = dataclasses.replace(cfg, head=DiscreteHeadConfig())
    policy = VLAPolicy(cfg)
    batch = cfg.fake_batch(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        policy(batch)
        policy.predict_action_chunk(batch)
