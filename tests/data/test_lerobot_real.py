"""A dataset written by the real `lerobot` library (0.4.4) reads back with LeRobot's own values.

The fixture (tests/data/fixtures/lerobot_v30) was made by `make_fixture.py` through
`LeRobotDataset.create / add_frame / save_episode / finalize` with LeRobot's defaults (AV1
video, pandas-index task strings stored as large_string, per-episode stats columns, an episode
whose instruction changes halfway); `expected.json` is what `lerobot.LeRobotDataset(...)[i]`
returned for every frame.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from craftvla.data import LeRobotDataset
from craftvla.data.lerobot_meta import load_meta

FIXTURE = Path(__file__).parent / "fixtures" / "lerobot_v30"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


@pytest.fixture(scope="module")
def dataset() -> LeRobotDataset:
    return LeRobotDataset(FIXTURE / "dataset", chunk_size=4)


def test_metadata_matches_lerobot(dataset):
    meta = load_meta(FIXTURE / "dataset")
    assert meta.tasks == EXPECTED["tasks"]
    assert meta.fps == EXPECTED["fps"] and meta.total_episodes == EXPECTED["num_episodes"]
    assert len(dataset) == EXPECTED["num_frames"] == len(EXPECTED["frames"])
    assert dataset.meta.camera_keys == [EXPECTED["camera"]]
    assert (dataset.meta.state_dim, dataset.meta.action_dim) == (4, 4)
    # LeRobot's stats.json: vectors per dimension, images per channel as (3, 1, 1)
    assert dataset.stats["action"]["mean"].shape == (4,)
    assert dataset.stats[EXPECTED["camera"]]["mean"].shape == (3, 1, 1)


@pytest.mark.parametrize("frame", EXPECTED["frames"], ids=lambda f: f"index{f['index']}")
def test_every_frame_matches_lerobot(dataset, frame):
    item = dataset[frame["index"]]
    assert item["task"] == frame["task"]
    assert (item["episode_index"], item["frame_index"]) == (frame["episode_index"], frame["frame_index"])
    assert item["timestamp"] == pytest.approx(frame["timestamp"], abs=1e-6)
    np.testing.assert_array_equal(item["observation.state"].numpy(), np.float32(frame["observation.state"]))
    np.testing.assert_array_equal(item["action"][0].numpy(), np.float32(frame["action"]))  # chunk row 0 = a_t
    # Same AV1 stream decoded by PyAV (ours) and torchcodec (LeRobot's): identical here to 1e-7;
    # 1e-3 (a quarter of one 8-bit level) leaves room for another FFmpeg's colour conversion.
    mean = item[EXPECTED["camera"]].mean(dim=(1, 2)).numpy()
    np.testing.assert_allclose(mean, frame["image_mean"], atol=1e-3)


def test_action_chunks_follow_lerobot_rows(dataset):
    """Row k of the chunk at frame i is LeRobot's action at i + k, clamped to the episode end."""
    frames = EXPECTED["frames"]
    last = {f["episode_index"]: f["index"] for f in frames}  # last index of each episode
    for f in frames:
        item = dataset[f["index"]]
        for k in range(4):
            src = min(f["index"] + k, last[f["episode_index"]])
            np.testing.assert_array_equal(item["action"][k].numpy(), np.float32(frames[src]["action"]))
            assert bool(item["action_is_pad"][k]) == (f["index"] + k > last[f["episode_index"]])


def test_list_encodings_read_the_same(tmp_path):
    """Other writers of the same layout (pandas, HF datasets versions) store vectors as list /
    large_list instead of fixed_size_list and strings as large_string: the values are the same."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(shutil.copytree(FIXTURE / "dataset", tmp_path / "ds"))
    data = root / "data/chunk-000/file-000.parquet"
    table = pq.read_table(data)
    for name, typ in (("action", pa.large_list(pa.float32())), ("observation.state", pa.list_(pa.float64()))):
        table = table.set_column(table.column_names.index(name), name, table[name].cast(typ))
    pq.write_table(table, data)
    episodes = root / "meta/episodes/chunk-000/file-000.parquet"
    ep = pq.read_table(episodes)
    pq.write_table(
        ep.set_column(ep.column_names.index("tasks"), "tasks", ep["tasks"].cast(pa.large_list(pa.large_string()))),
        episodes,
    )
    ds = LeRobotDataset(root, chunk_size=1)
    for frame in EXPECTED["frames"][::7]:
        item = ds[frame["index"]]
        np.testing.assert_array_equal(item["action"][0].numpy(), np.float32(frame["action"]))
        np.testing.assert_array_equal(item["observation.state"].numpy(), np.float32(frame["observation.state"]))
