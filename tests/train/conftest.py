"""Shared helpers for the training tests: a micro policy, a tiny LeRobot dataset, config builders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("MUJOCO_GL", "egl")

CAM = "observation.images.corner"

# The tiny preset shrunk so that a training step takes milliseconds (shapes, not quality).
MICRO_ARGS = [
    "--policy.vision.image_size",
    "32",
    "--policy.vision.width",
    "32",
    "--policy.vision.depth",
    "2",
    "--policy.vision.num_heads",
    "2",
    "--policy.llm.hidden_size",
    "64",
    "--policy.llm.num_layers",
    "2",
    "--policy.llm.intermediate_size",
    "128",
    "--policy.head.hidden_dim",
    "32",
    "--policy.chunk_size",
    "4",
    "--policy.num_action_queries",
    "4",
    "--log.progress",
    "false",
    "--log.plots",
    "false",
]


def train_config(out: Path, *args: str):
    """A TrainConfig for the micro policy writing to `out`, with extra command-line flags."""
    from craftvla.train.config import parse_train_config

    return parse_train_config([*MICRO_ARGS, "--output_dir", str(out), *args])


def micro_policy_config():
    from craftvla.train.config import parse_train_config

    return parse_train_config(MICRO_ARGS).policy


def write_tiny_dataset(root: Path, episodes: int = 3, length: int = 12, size: int = 32, fps: int = 10) -> Path:
    """A LeRobot v3 dataset whose actions depend on the image and state (learnable, tiny)."""
    from craftvla.data import LeRobotDatasetWriter

    features = {
        CAM: {"dtype": "video", "shape": (size, size, 3), "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": (4,), "names": None},
        "action": {"dtype": "float32", "shape": (4,), "names": None},
    }
    rng = np.random.default_rng(0)
    writer = LeRobotDatasetWriter(root, fps=fps, features=features, robot_type="sawyer")
    for ep in range(episodes):
        for f in range(length):
            img = np.full((size, size, 3), 30 + 60 * ep, np.uint8)
            img[:, : 2 + 2 * f] = 200
            st = rng.normal(size=4).astype(np.float32)
            writer.add_frame(
                {CAM: img, "observation.state": st, "action": np.tanh(st + 0.1 * f)},
                task=["close the drawer", "open the door"][ep % 2],
            )
        writer.save_episode()
    return writer.finalize()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


def unpadded_fake_batch(cfg, batch_size: int, seed: int = 0) -> dict:
    """cfg.fake_batch without padded steps: the L1 loss then averages the same number of terms in
    every micro-batch, which is when accumulation is exactly equivalent to one big batch."""
    batch = cfg.fake_batch(batch_size, seed=seed)
    batch["action_is_pad"] = torch.zeros_like(batch["action_is_pad"])
    return batch
