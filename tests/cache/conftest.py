"""Fixtures for the anchor-cache tests: a small checkpoint and a small anchor dataset (seconds)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from craftvla.config import L1BridgeHeadConfig, LLMConfig, VisionConfig, VLAConfig

CAM = "observation.images.corner"
SIZE = 32
TASKS = ["open the drawer", "press the red button from the top", "reach"]


def small_config() -> VLAConfig:
    """The tiny preset shrunk: 2-block ViT at 32 px (16 patches), a 3-layer Qwen2 of width 64."""
    return dataclasses.replace(
        VLAConfig.preset("tiny"),
        vision=VisionConfig(backbone_id="tiny-vit", image_size=SIZE, patch_size=8, width=32, depth=2, num_heads=2),
        llm=LLMConfig(
            family="qwen2",
            hidden_size=64,
            num_layers=3,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=128,
            max_text_tokens=40,
        ),
        head=L1BridgeHeadConfig(hidden_dim=32, num_heads=2),
        num_action_queries=4,
        chunk_size=4,
    )


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    from craftvla.model.policy import VLAPolicy

    torch.manual_seed(0)
    policy = VLAPolicy(small_config())
    with torch.no_grad():  # queries start at zero; give them values so every token differs
        policy.action_queries.weight.normal_(0, 0.02)
    path = tmp_path_factory.mktemp("ckpt") / "policy"
    policy.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def anchor_dataset(tmp_path_factory) -> Path:
    """3 episodes x 4 frames of random 32x32 images, tasks of different lengths (text padding)."""
    from craftvla.data import LeRobotDatasetWriter

    rng = np.random.default_rng(0)
    features = {
        CAM: {"dtype": "video", "shape": (SIZE, SIZE, 3), "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": (4,), "names": None},
        "action": {"dtype": "float32", "shape": (4,), "names": None},
    }
    root = tmp_path_factory.mktemp("anchor") / "ds"
    writer = LeRobotDatasetWriter(root, fps=10, features=features)
    for ep in range(3):
        for _ in range(4):
            frame = {
                CAM: rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8),
                "observation.state": rng.normal(size=4).astype(np.float32),
                "action": rng.normal(size=4).astype(np.float32),
            }
            writer.add_frame(frame, task=TASKS[ep])
        writer.save_episode()
    return writer.finalize()


@pytest.fixture(scope="session")
def build(checkpoint, anchor_dataset, tmp_path_factory):
    """build(**flags) -> cache dir; identical flags reuse one build for the whole session."""
    from craftvla.craft.cache_build import CacheBuildConfig, build_cache

    made: dict = {}

    def _build(**flags):
        key = tuple(sorted((k, str(v)) for k, v in flags.items()))
        if key not in made:
            out = tmp_path_factory.mktemp("cache") / "c"
            cfg = CacheBuildConfig(
                checkpoint=str(checkpoint),
                dataset=str(anchor_dataset),
                out=str(out),
                batch_size=4,
                device="cpu",
                **flags,
            )
            made[key] = build_cache(cfg)
        return made[key]

    return _build


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one intra-op thread is faster than two on a shared 2-core machine
    (measured: 0.03 s vs 1.7 s per encode + backward at load 7); restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
