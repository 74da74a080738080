"""`collect`: a short run yields a LeRobot v3 dataset that the reader loads, reproducibly."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from craftvla.errors import ConfigError
from craftvla.keys import STATE_KEY
from craftvla.sim.collect import CollectConfig, collect
from craftvla.sim.metaworld import COLLECT_STREAM
from craftvla.sim.policies import ExpertPolicy
from craftvla.sim.rollout import RolloutSpec, run_episodes

TASK = "button-press-topdown-v3"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("mw") / "ds"
    cfg = CollectConfig(out=str(root), tasks=TASK, episodes=2, max_steps=120, extra_steps=3, seed=7)
    summary = collect(cfg)
    return root, cfg, summary


def test_collect_writes_a_dataset_the_reader_loads(dataset):
    from craftvla.data import LeRobotDataset

    root, cfg, summary = dataset
    assert summary[TASK]["kept"] == 2 and summary[TASK]["solved"] == summary[TASK]["tried"] == 2
    info = json.loads((root / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 80 and info["total_episodes"] == 2
    assert info["robot_type"] == "sawyer"
    ds = LeRobotDataset(root, chunk_size=8)
    table = pq.read_table(root / "data" / "chunk-000" / "file-000.parquet")
    assert len(ds) == table.num_rows == info["total_frames"]
    item = ds[len(ds) - 1]  # the last frame: its chunk runs past the episode end
    assert item["task"] == "press the button from the top"
    assert tuple(item["observation.images.corner"].shape) == (3, 64, 64)
    assert item["action_is_pad"][1:].all() and not item["action_is_pad"][0]
    actions = np.stack(table.column("action").to_numpy(zero_copy_only=False))
    assert actions.shape[1] == 4
    # The expert's P-gains exceed 1; what is stored is what the env applied: clipped to [-1, 1].
    assert np.abs(actions).max() == 1.0 and (np.abs(actions) == 1.0).sum() > 1


def test_collect_is_reproducible(dataset):
    """The stored states/actions equal a fresh run of the same episodes (seed 7, collect stream)."""
    root, cfg, _ = dataset
    table = pq.read_table(root / "data" / "chunk-000" / "file-000.parquet")
    stored_actions = np.stack(table.column("action").to_numpy(zero_copy_only=False))
    stored_states = np.stack(table.column(STATE_KEY).to_numpy(zero_copy_only=False))
    spec = RolloutSpec(seed=7, stream=COLLECT_STREAM, max_steps=120, extra_steps=3, record=True)
    frames = [f for ep in run_episodes(ExpertPolicy(), TASK, 2, spec) for f in ep.frames]
    np.testing.assert_array_equal(stored_actions, np.stack([f["action"] for f in frames]))
    np.testing.assert_array_equal(stored_states, np.stack([f[STATE_KEY] for f in frames]))


def test_collect_refuses_a_nonempty_out_and_bad_flags(tmp_path):
    from craftvla.errors import CraftVLAError

    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(CraftVLAError, match="not empty"):
        collect(CollectConfig(out=str(tmp_path), tasks=TASK, episodes=1))
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    with pytest.raises(ConfigError, match="episodes"):
        CollectConfig(out="x", episodes=0)
    with pytest.raises(ConfigError, match="env"):
        CollectConfig(out="x", env="libero")
