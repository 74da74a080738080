"""Bad input -> one CraftVLAError naming the file; the reader never writes anything."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from lerobot_synth import CAM, action, features, image, state, tree, write_dataset

from craftvla.data import LeRobotDataset, LeRobotDatasetWriter
from craftvla.errors import CraftVLAError

DATA = "data/chunk-000/file-000.parquet"
VIDEO = f"videos/{CAM}/chunk-000/file-000.mp4"


@pytest.fixture()
def copy(dataset_root, tmp_path) -> Path:
    return Path(shutil.copytree(dataset_root, tmp_path / "copy"))


def _edit_info(root: Path, fn) -> None:
    info = json.loads((root / "meta/info.json").read_text())
    fn(info)
    (root / "meta/info.json").write_text(json.dumps(info))


def _edit_data(root: Path, fn) -> None:
    table = pq.read_table(root / DATA)
    pq.write_table(fn(table), root / DATA)


def _nan_action(table: pa.Table) -> pa.Table:
    acts = np.stack(table["action"].to_numpy(zero_copy_only=False)).astype(np.float32)
    acts[5, 2] = np.nan
    col = pa.FixedSizeListArray.from_arrays(pa.array(acts.reshape(-1)), 4)
    return table.set_column(table.column_names.index("action"), "action", col)


def _inf_state(table: pa.Table) -> pa.Table:
    st = np.stack(table["observation.state"].to_numpy(zero_copy_only=False)).astype(np.float32)
    st[3, 0] = np.inf
    col = pa.FixedSizeListArray.from_arrays(pa.array(st.reshape(-1)), 4)
    return table.set_column(table.column_names.index("observation.state"), "observation.state", col)


EPISODES = "meta/episodes/chunk-000/file-000.parquet"


def _edit_episodes(root: Path, fn) -> None:
    table = pq.read_table(root / EPISODES)
    pq.write_table(fn(table), root / EPISODES)


def _shift_last_slice(table: pa.Table, seconds: float) -> pa.Table:
    """Move the last episode's video slice `seconds` later (past the end of the mp4)."""
    for side in ("from", "to"):
        name = f"videos/{CAM}/{side}_timestamp"
        values = table[name].to_pylist()
        values[-1] += seconds
        table = table.set_column(table.column_names.index(name), name, pa.array(values, pa.float64()))
    return table


def _set_column(name: str, row: int, value):
    def fn(table: pa.Table) -> pa.Table:
        values = table[name].to_pylist()
        values[row] = value
        return table.set_column(table.column_names.index(name), name, pa.array(values, table.schema.field(name).type))

    return fn


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


CASES = {
    "missing info.json": (lambda r: (r / "meta/info.json").unlink(), "meta/info.json", "not found"),
    "v2.1": (
        lambda r: _edit_info(r, lambda i: i.update(codebase_version="v2.1")),
        "meta/info.json",
        "old LeRobot layout",
    ),
    "unknown version": (
        lambda r: _edit_info(r, lambda i: i.update(codebase_version="v9.9")),
        "meta/info.json",
        "unknown codebase_version",
    ),
    "missing video": (lambda r: (r / VIDEO).unlink(), VIDEO, "video file not found"),
    "missing parquet": (lambda r: (r / DATA).unlink(), DATA, "not found"),
    "state shape": (
        lambda r: _edit_info(r, lambda i: i["features"]["observation.state"].update(shape=[5])),
        DATA,
        "shape (5,)",
    ),
    "image shape": (lambda r: _edit_info(r, lambda i: i["features"][CAM].update(shape=[64, 64, 3])), VIDEO, "says"),
    "nan action": (lambda r: _edit_data(r, _nan_action), DATA, "NaN/inf"),
    "inf state": (lambda r: _edit_data(r, _inf_state), DATA, "NaN/inf"),
    "missing tasks": (lambda r: (r / "meta/tasks.parquet").unlink(), "meta/tasks.parquet", "not found"),
    # meta files missing, unreadable or out of range
    "info not JSON": (lambda r: (r / "meta/info.json").write_text("{'fps': 10"), "meta/info.json", "not valid JSON"),
    "info not an object": (
        lambda r: (r / "meta/info.json").write_text("[1, 2]"),
        "meta/info.json",
        "expected a JSON object",
    ),
    "stats not JSON": (lambda r: (r / "meta/stats.json").write_text("nan nan"), "meta/stats.json", "not valid JSON"),
    "fps 0": (lambda r: _edit_info(r, lambda i: i.update(fps=0)), "meta/info.json", "fps=0; expected a positive"),
    "fps negative": (lambda r: _edit_info(r, lambda i: i.update(fps=-30)), "meta/info.json", "fps=-30"),
    "fps not a number": (lambda r: _edit_info(r, lambda i: i.update(fps="10")), "meta/info.json", "fps='10'"),
    "no action feature": (
        lambda r: _edit_info(r, lambda i: i["features"].pop("action")),
        "meta/info.json",
        "features has no 'action' entry",
    ),
    "bad feature shape": (
        lambda r: _edit_info(r, lambda i: i["features"]["observation.state"].update(shape="4")),
        "meta/info.json",
        "features['observation.state']",
    ),
    "video shape 2-D": (
        lambda r: _edit_info(r, lambda i: i["features"][CAM].update(shape=[48, 64])),
        "meta/info.json",
        "expected [height, width, 3]",
    ),
    "total_frames 0": (lambda r: _edit_info(r, lambda i: i.update(total_frames=0)), "meta/info.json", "total_frames=0"),
    "missing episodes": (lambda r: shutil.rmtree(r / "meta/episodes"), "meta/episodes", "no episode metadata files"),
    "truncated episodes": (lambda r: _truncate(r / EPISODES), EPISODES, "cannot read parquet"),
    "truncated tasks": (lambda r: _truncate(r / "meta/tasks.parquet"), "meta/tasks.parquet", "cannot read parquet"),
    # data and video files
    "truncated parquet": (lambda r: _truncate(r / DATA), DATA, "cannot read parquet"),
    "truncated video": (lambda r: _truncate(r / VIDEO), VIDEO, "not a readable video"),
    "not a video": (lambda r: (r / VIDEO).write_text("hello, I am text"), VIDEO, "not a readable video"),
    "slice past the video end": (
        lambda r: _edit_episodes(r, lambda t: _shift_last_slice(t, 1.0)),
        VIDEO,
        "but the video lasts",
    ),
    "slice of the wrong length": (
        lambda r: _edit_episodes(r, _set_column(f"videos/{CAM}/to_timestamp", 0, 0.5)),
        "meta/episodes",
        "does not hold its 12 frames",
    ),
    "image features": (
        lambda r: _edit_info(r, lambda i: i["features"][CAM].update(dtype="image")),
        "meta/info.json",
        "stored as per-frame images",
    ),
    "timestamp off its frame": (
        lambda r: _edit_data(r, _set_column("timestamp", 3, 7.0)),
        "data",
        "timestamps must be frame_index / fps",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_names_the_file_and_writes_nothing(copy, case):
    corrupt, rel, words = CASES[case]
    corrupt(copy)
    before = tree(copy)
    with pytest.raises(CraftVLAError) as err:
        LeRobotDataset(copy)
    msg = str(err.value)
    assert str(copy / rel) in msg and words in msg, msg
    assert "\n" not in msg
    assert tree(copy) == before


def test_video_truncated_after_its_header_fails_at_first_access_naming_the_file(tmp_path):
    """LeRobot's mp4s carry their index up front (faststart): a file cut short still opens, so
    the damage shows only when the missing frames are decoded; that error names the file too."""
    real = Path(__file__).parent / "fixtures" / "lerobot_v30" / "dataset"
    copy = Path(shutil.copytree(real, tmp_path / "real"))
    mp4 = next((copy / "videos").rglob("*.mp4"))
    _truncate(mp4, keep=0.6)
    ds = LeRobotDataset(copy)
    with pytest.raises(CraftVLAError) as err:
        ds[len(ds) - 1]
    assert str(mp4) in str(err.value) and "\n" not in str(err.value)


def test_missing_root(tmp_path):
    with pytest.raises(CraftVLAError, match="dataset directory not found"):
        LeRobotDataset(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_writer_refuses_non_empty_root(dataset_root):
    before = tree(dataset_root)
    with pytest.raises(CraftVLAError, match="not empty"):
        LeRobotDatasetWriter(dataset_root, fps=10, features=features())
    assert tree(dataset_root) == before


def test_writer_accepts_existing_empty_root(tmp_path):
    (tmp_path / "empty").mkdir()
    root = write_dataset(tmp_path / "empty", [3])
    assert LeRobotDataset(root).meta.total_frames == 3


def test_writer_rejects_bad_frames_and_interrupted_write_leaves_nothing(tmp_path):
    root = tmp_path / "ds"
    with pytest.raises(CraftVLAError, match="NaN"):
        with LeRobotDatasetWriter(root, fps=10, features=features()) as w:
            w.add_frame({CAM: image(0, 0), "observation.state": state(0, 0), "action": action(0, 0)}, task="t")
            w.save_episode()
            bad = action(0, 1)
            bad[0] = np.nan
            w.add_frame({CAM: image(0, 1), "observation.state": state(0, 1), "action": bad}, task="t")
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor its temporary directory


def test_writer_shape_and_key_checks(tmp_path):
    w = LeRobotDatasetWriter(tmp_path / "ds", fps=10, features=features())
    with pytest.raises(CraftVLAError, match="observation.state"):
        w.add_frame({CAM: image(0, 0), "observation.state": np.zeros(3, np.float32), "action": action(0, 0)}, task="t")
    with pytest.raises(CraftVLAError, match="uint8"):
        w.add_frame(
            {CAM: image(0, 0).astype(np.float32), "observation.state": state(0, 0), "action": action(0, 0)}, task="t"
        )
    with pytest.raises(CraftVLAError, match="missing"):
        w.add_frame({CAM: image(0, 0), "action": action(0, 0)}, task="t")
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_writer_clear_episode_drops_frames(tmp_path):
    w = LeRobotDatasetWriter(tmp_path / "ds", fps=10, features=features())
    for ep, keep in enumerate([True, False, True]):
        for f in range(4):
            w.add_frame({CAM: image(ep, f), "observation.state": state(ep, f), "action": action(ep, f)}, task="t")
        w.save_episode() if keep else w.clear_episode()
    ds = LeRobotDataset(w.finalize())
    assert ds.meta.total_episodes == 2 and len(ds) == 8
    assert ds[4]["observation.state"][0].item() == 2.0  # the third recorded episode, saved second
