"""`craftvla train --init_from <VLA-Adapter release>`: fine-tune the release as released, with LoRA
and CRaFT's actions target (its own chunks on anchor frames)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from craftvla.model import released
from craftvla.model.policy import VLAPolicy
from craftvla.train.config import parse_train_config
from tests.model.test_vla_adapter_chain import CHAIN, reduced_base

QUIET = ["--log.progress", "false", "--log.plots", "false"]


def write_libero_like(root: Path, episodes: int = 2, length: int = 12) -> Path:
    """Two 32 px cameras with the release's keys, 8-D state, 7-D actions (LIBERO's sizes)."""
    from craftvla.data import LeRobotDatasetWriter

    video = {"dtype": "video", "shape": (32, 32, 3), "names": ["height", "width", "channels"]}
    features = {
        "observation.images.image": video,
        "observation.images.wrist_image": video,
        "observation.state": {"dtype": "float32", "shape": (8,), "names": None},
        "action": {"dtype": "float32", "shape": (7,), "names": None},
    }
    rng = np.random.default_rng(0)
    writer = LeRobotDatasetWriter(root, fps=10, features=features, robot_type="panda")
    for ep in range(episodes):
        for f in range(length):
            img = np.full((32, 32, 3), 40 + 80 * ep, np.uint8)
            img[:, : 2 + 2 * f] = 220
            state = rng.normal(size=8).astype(np.float32)
            frame = {"observation.images.image": img, "observation.images.wrist_image": 255 - img}
            frame |= {"observation.state": state, "action": np.tanh(state[:7] + 0.1 * f)}
            writer.add_frame(frame, task=["pick up the bowl", "open the drawer"][ep % 2])
        writer.save_episode()
    return writer.finalize()


@pytest.fixture
def reduced_releases(monkeypatch):
    monkeypatch.setattr(released, "release_base", reduced_base)


def test_init_from_a_release_fine_tunes_it_with_lora_and_craft_actions(reduced_releases, tmp_path):
    from craftvla.train.loop import train

    data = write_libero_like(tmp_path / "libero_like")
    args = ["--init_from", str(CHAIN / "release"), "--dataset.root", str(data), "--output_dir", str(tmp_path / "run")]
    args += ["--steps", "3", "--batch_size", "2", "--lora.rank", "4", "--craft.enabled", "true"]
    args += ["--craft.targets", "actions", "--craft.anchor_dataset", str(data), "--log.log_freq", "1", *QUIET]
    cfg = parse_train_config(args)
    assert cfg.policy.head.type == "vla_adapter" and cfg.policy.llm.prompt == released.VLA_ADAPTER_PROMPT
    start = VLAPolicy.from_pretrained(CHAIN / "release")
    run = train(cfg)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    retention = [m["craft/retention_loss"] for m in lines]
    assert len(retention) == 3 and retention[0] == pytest.approx(0.0, abs=1e-6)  # the start is its own anchor
    assert retention[-1] > 0 and all(np.isfinite(m["loss"]) for m in lines)  # then it moved, and it is measured
    saved = VLAPolicy.from_pretrained(tmp_path / "run" / "checkpoints" / "last")
    assert saved.config.head.type == "vla_adapter" and saved.config.llm.prompt == released.VLA_ADAPTER_PROMPT
    assert saved.processor.stats_source.endswith(f"({start.processor.stats_source})")  # --init_stats keep
    moved = saved.action_head.model.fc2.weight - start.action_head.model.fc2.weight
    assert moved.abs().max() > 0  # the head trained
    assert torch.equal(saved.llm.model.embed_tokens.weight, start.llm.model.embed_tokens.weight)  # LoRA: base kept
    assert run.policy is not None
