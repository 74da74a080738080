"""Write a LeRobot v3.0 dataset: many episodes per parquet file and per mp4, built atomically.

Everything is written into a hidden temporary sibling directory and renamed onto `root` in
`finalize()`, so an interrupted run leaves no complete-looking dataset and never touches an
existing one. Layout and key names: see `lerobot_meta.py` (each checked against LeRobot's source).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from craftvla.errors import CraftVLAError
from craftvla.files import write_json_atomic

from . import stats as S
from .lerobot_meta import (
    CODEBASE_VERSION,
    DATA_PATH,
    DEFAULT_CHUNKS_SIZE,
    DEFAULT_DATA_FILE_SIZE_IN_MB,
    DEFAULT_FEATURES,
    DEFAULT_VIDEO_FILE_SIZE_IN_MB,
    EPISODES_PATH,
    INFO_PATH,
    STATS_PATH,
    TASKS_PATH,
    VIDEO_PATH,
    next_chunk_file,
)
from .video import VideoFileEncoder, pick_encoder, video_info

NUMERIC_DTYPES = {"float32", "float64", "int64", "int32", "bool"}


def _check_features(features: dict[str, dict]) -> dict[str, dict]:
    """Validate user features; returns copies with list shapes (as info.json stores them)."""
    if not features:
        raise CraftVLAError("features: empty; expected at least an 'action' feature")
    out = {}
    for key, ft in features.items():
        if "/" in key or key in DEFAULT_FEATURES:
            raise CraftVLAError(f"features[{key!r}]: reserved name or contains '/'")
        dtype, shape = ft.get("dtype"), list(ft.get("shape", []))
        if dtype == "video":
            if len(shape) != 3 or shape[2] != 3:
                raise CraftVLAError(f"features[{key!r}]: video shape must be (H, W, 3), got {tuple(shape)}")
        elif dtype not in NUMERIC_DTYPES or len(shape) != 1:
            raise CraftVLAError(
                f"features[{key!r}]: dtype {dtype!r} shape {tuple(shape)} unsupported; "
                f"expected 'video' (H, W, 3) or one of {sorted(NUMERIC_DTYPES)} with a 1-D shape"
            )
        out[key] = {"dtype": dtype, "shape": shape, "names": ft.get("names")}
    if "action" not in out:
        raise CraftVLAError("features: no 'action' feature")
    return out


def _tasks_table(tasks: list[str]) -> pa.Table:
    """meta/tasks.parquet as pandas would write LeRobot's frame (task string as the index)."""
    table = pa.table({"task": pa.array(tasks, pa.string()), "task_index": pa.array(range(len(tasks)), pa.int64())})
    pandas_meta = {  # the pandas parquet metadata spec: lets pd.read_parquet restore the index
        "index_columns": ["task"],
        "column_indexes": [
            {
                "name": None,
                "field_name": None,
                "pandas_type": "unicode",
                "numpy_type": "object",
                "metadata": {"encoding": "UTF-8"},
            }
        ],
        "columns": [
            {
                "name": "task_index",
                "field_name": "task_index",
                "pandas_type": "int64",
                "numpy_type": "int64",
                "metadata": None,
            },
            {"name": "task", "field_name": "task", "pandas_type": "unicode", "numpy_type": "object", "metadata": None},
        ],
        "creator": {"library": "craftvla"},
        "pandas_version": "2.2.0",
    }
    return table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})


class LeRobotDatasetWriter:
    """Builds a v3.0 dataset frame by frame: `add_frame`, `save_episode`, `finalize`.

    Example:
        w = LeRobotDatasetWriter(root, fps=10, features={...}, robot_type="sawyer")
        w.add_frame({"observation.images.corner": img, "observation.state": s, "action": a}, task="...")
        w.save_episode()
        w.finalize()  # -> root
    """

    def __init__(
        self,
        root: str | Path,
        fps: int,
        features: dict[str, dict],
        robot_type: str | None = None,
        video_codec: str = "h264",
        chunks_size: int = DEFAULT_CHUNKS_SIZE,
        data_files_size_in_mb: float = DEFAULT_DATA_FILE_SIZE_IN_MB,
        video_files_size_in_mb: float = DEFAULT_VIDEO_FILE_SIZE_IN_MB,
    ) -> None:
        self.root = Path(root)
        if self.root.exists() and (not self.root.is_dir() or any(self.root.iterdir())):
            raise CraftVLAError(f"{self.root}: already exists and is not empty; refusing to overwrite")
        if fps <= 0 or chunks_size <= 0 or data_files_size_in_mb <= 0 or video_files_size_in_mb <= 0:
            raise CraftVLAError(
                f"writer settings must be positive: fps={fps}, chunks_size={chunks_size}, "
                f"data_files_size_in_mb={data_files_size_in_mb}, video_files_size_in_mb={video_files_size_in_mb}"
            )
        self.fps = int(fps)
        self.features = _check_features(features)
        self.video_keys = [k for k, ft in self.features.items() if ft["dtype"] == "video"]
        self.encoder = pick_encoder(video_codec) if self.video_keys else None
        self.robot_type, self.chunks_size = robot_type, chunks_size
        self.data_mb, self.video_mb = data_files_size_in_mb, video_files_size_in_mb
        self.tmp = self.root.parent / f".{self.root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir(parents=True)
        self._tasks: dict[str, int] = {}  # task string -> task_index
        self._episodes: list[dict[str, Any]] = []  # one meta/episodes row per saved episode
        self._numeric: dict[str, list[np.ndarray]] = {}  # all frames of numeric features, for stats
        self._image_stats: dict[str, list[dict]] = {k: [] for k in self.video_keys}
        self._buffer: list[tuple[dict[str, np.ndarray], str]] = []  # current episode's frames
        self._total_frames = 0
        self._data = {"chunk": 0, "file": 0, "mb": 0.0, "writer": None}  # current data parquet
        self._videos: dict[str, dict] = {k: {"chunk": 0, "file": 0, "enc": None} for k in self.video_keys}
        self._done = False

    # -- frames ---------------------------------------------------------------------------------

    def _check_value(self, key: str, value: Any) -> np.ndarray:
        ft = self.features[key]
        where = f"frame {len(self._buffer)} of episode {len(self._episodes)}, feature {key!r}"
        arr = np.asarray(value)
        if ft["dtype"] == "video":
            if arr.dtype != np.uint8 or arr.shape != tuple(ft["shape"]):
                raise CraftVLAError(f"{where}: expected uint8 {tuple(ft['shape'])}, got {arr.dtype} {arr.shape}")
            return arr
        arr = arr.reshape(-1) if arr.size == ft["shape"][0] else arr
        if arr.shape != tuple(ft["shape"]):
            raise CraftVLAError(f"{where}: expected shape {tuple(ft['shape'])}, got {np.asarray(value).shape}")
        if ft["dtype"].startswith("float") and not np.isfinite(arr).all():
            raise CraftVLAError(f"{where}: contains NaN or inf: {arr.tolist()}")
        return arr.astype(ft["dtype"])

    def add_frame(self, frame: dict[str, Any], task: str) -> None:
        """Buffer one frame of the current episode (every feature, images as uint8 (H, W, 3))."""
        self._check_open()
        if set(frame) != set(self.features):
            raise CraftVLAError(
                f"add_frame: keys differ from the features; missing {sorted(set(self.features) - set(frame))}, "
                f"unexpected {sorted(set(frame) - set(self.features))}"
            )
        if not isinstance(task, str) or not task:
            raise CraftVLAError(f"add_frame: task must be a non-empty string, got {task!r}")
        self._buffer.append(({k: self._check_value(k, v) for k, v in frame.items()}, task))

    def clear_episode(self) -> None:
        """Drop the frames buffered for the current episode (e.g. a failed demonstration)."""
        self._buffer = []

    # -- episodes -------------------------------------------------------------------------------

    def save_episode(self) -> None:
        """End the current episode: encode its video slices, append its rows, record metadata."""
        self._check_open()
        if not self._buffer:
            raise CraftVLAError("save_episode: no frames added since the last episode")
        ep, length = len(self._episodes), len(self._buffer)
        tasks = [t for _, t in self._buffer]
        for t in dict.fromkeys(tasks):
            self._tasks.setdefault(t, len(self._tasks))
        columns = self._episode_columns(ep, tasks)
        row = {"episode_index": ep, "tasks": list(dict.fromkeys(tasks)), "length": length}
        row.update(self._write_data(columns))
        ep_stats = {k: S.vector_stats(np.asarray(v).reshape(length, -1)) for k, v in columns.items()}
        for key in self.video_keys:
            frames = np.stack([f[key] for f, _ in self._buffer])  # (T, H, W, 3)
            row.update(self._write_video(key, frames))
            ep_stats[key] = S.image_stats(frames[S.sample_indices(length)])
            self._image_stats[key].append(ep_stats[key])
        row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
        row.update({f"stats/{k}/{n}": v.tolist() for k, st in ep_stats.items() for n, v in st.items()})
        self._episodes.append(row)
        self._total_frames += length
        self._buffer = []

    def _episode_columns(self, ep: int, tasks: list[str]) -> dict[str, np.ndarray]:
        """Numeric columns of the buffered episode, bookkeeping columns included."""
        length = len(self._buffer)
        cols = {k: np.stack([f[k] for f, _ in self._buffer]) for k in self.features if k not in self.video_keys}
        cols["timestamp"] = (np.arange(length) / self.fps).astype(np.float32)
        cols["frame_index"] = np.arange(length, dtype=np.int64)
        cols["episode_index"] = np.full(length, ep, dtype=np.int64)
        cols["index"] = np.arange(self._total_frames, self._total_frames + length, dtype=np.int64)
        cols["task_index"] = np.array([self._tasks[t] for t in tasks], dtype=np.int64)
        for k, v in cols.items():
            self._numeric.setdefault(k, []).append(v)
        return cols

    def _arrow_column(self, key: str, values: np.ndarray) -> pa.Array:
        shape = self.features[key]["shape"] if key in self.features else [1]
        if shape == [1]:  # LeRobot stores (1,) features as scalars (datasets.Value)
            return pa.array(values.reshape(-1))
        flat = pa.array(values.reshape(-1))
        return pa.FixedSizeListArray.from_arrays(flat, shape[0])  # datasets.Sequence(length=n)

    def _write_data(self, columns: dict[str, np.ndarray]) -> dict[str, int]:
        """Append an episode's rows to the current data file, starting a new file past the size limit."""
        table = pa.table({k: self._arrow_column(k, v) for k, v in columns.items()})
        d = self._data
        size_mb = table.nbytes / 2**20
        if d["writer"] is not None and d["mb"] + size_mb > self.data_mb:
            d["writer"].close()
            d["chunk"], d["file"] = next_chunk_file(d["chunk"], d["file"], self.chunks_size)
            d["writer"], d["mb"] = None, 0.0
        if d["writer"] is None:
            path = self.tmp / DATA_PATH.format(chunk_index=d["chunk"], file_index=d["file"])
            path.parent.mkdir(parents=True, exist_ok=True)
            d["writer"] = pq.ParquetWriter(path, table.schema, compression="snappy")
        d["writer"].write_table(table)
        d["mb"] += size_mb
        start = int(columns["index"][0])
        return {
            "data/chunk_index": d["chunk"],
            "data/file_index": d["file"],
            "dataset_from_index": start,
            "dataset_to_index": start + len(table),
        }

    def _write_video(self, key: str, frames: np.ndarray) -> dict[str, Any]:
        """Append an episode's frames to the camera's current mp4 (a new one once over the limit).

        The size is what the encoder has emitted so far; encoders hold back a lookahead of up to
        a few dozen frames, so a file can exceed the limit by that much.
        """
        v = self._videos[key]
        if v["enc"] is not None and v["enc"].bytes_written / 2**20 >= self.video_mb:
            v["enc"].close()
            v["chunk"], v["file"] = next_chunk_file(v["chunk"], v["file"], self.chunks_size)
            v["enc"] = None
        if v["enc"] is None:
            path = self.tmp / VIDEO_PATH.format(video_key=key, chunk_index=v["chunk"], file_index=v["file"])
            h, w, _ = self.features[key]["shape"]
            v["enc"] = VideoFileEncoder(path, self.fps, h, w, self.encoder)
        start, end = v["enc"].add_episode(frames)
        return {
            f"videos/{key}/chunk_index": v["chunk"],
            f"videos/{key}/file_index": v["file"],
            f"videos/{key}/from_timestamp": start / self.fps,
            f"videos/{key}/to_timestamp": end / self.fps,
        }

    # -- finalize -------------------------------------------------------------------------------

    def _dataset_stats(self) -> dict[str, dict[str, np.ndarray]]:
        """Exact stats of every numeric column over all frames; images aggregated over episodes."""
        out = {k: S.vector_stats(np.concatenate(v).reshape(self._total_frames, -1)) for k, v in self._numeric.items()}
        out.update({k: S.aggregate(v) for k, v in self._image_stats.items()})
        return out

    def _info(self) -> dict[str, Any]:
        features = {k: dict(ft) for k, ft in self.features.items()}
        for key in self.video_keys:
            features[key]["info"] = video_info(self.tmp / VIDEO_PATH.format(video_key=key, chunk_index=0, file_index=0))
        features.update({k: dict(ft) for k, ft in DEFAULT_FEATURES.items()})
        n = len(self._episodes)
        return {
            "codebase_version": CODEBASE_VERSION,
            "robot_type": self.robot_type,
            "total_episodes": n,
            "total_frames": self._total_frames,
            "total_tasks": len(self._tasks),
            "chunks_size": self.chunks_size,
            "data_files_size_in_mb": self.data_mb,
            "video_files_size_in_mb": self.video_mb,
            "fps": self.fps,
            "splits": {"train": f"0:{n}"},
            "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if self.video_keys else None,
            "features": features,
        }

    def finalize(self) -> Path:
        """Close files, write meta/ (info, tasks, episodes, stats) and move the dataset into place."""
        self._check_open()
        if self._buffer:
            raise CraftVLAError(f"finalize: {len(self._buffer)} frames added but not saved; call save_episode()")
        if not self._episodes:
            raise CraftVLAError("finalize: no episodes saved")
        if self._data["writer"] is not None:
            self._data["writer"].close()
        for v in self._videos.values():
            v["enc"].close()
        # One episodes file: its rows are small (~1 kB per episode), far below any size limit.
        ep_path = self.tmp / EPISODES_PATH.format(chunk_index=0, file_index=0)
        ep_path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(self._episodes), ep_path)
        pq.write_table(_tasks_table(list(self._tasks)), self.tmp / TASKS_PATH)
        write_json_atomic(self.tmp / STATS_PATH, S.to_jsonable(self._dataset_stats()), indent=4)
        write_json_atomic(self.tmp / INFO_PATH, self._info(), indent=4)  # last: its presence marks completion
        self._move_into_place()
        return self.root

    def _move_into_place(self) -> None:
        if self.root.exists() and (not self.root.is_dir() or any(self.root.iterdir())):
            self.abort()
            raise CraftVLAError(f"{self.root}: appeared while writing and is not empty; refusing to overwrite")
        try:
            os.rename(self.tmp, self.root)  # atomic; replaces only an empty directory
        except OSError as err:
            self.abort()
            raise CraftVLAError(f"{self.root}: cannot move the finished dataset into place ({err})") from err
        self._done = True

    def abort(self) -> None:
        """Discard everything written so far (the temporary directory)."""
        for v in self._videos.values():
            if v["enc"] is not None:
                try:
                    v["enc"].close()
                except Exception:  # noqa: BLE001 - best effort while discarding
                    pass
                v["enc"] = None
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._done = True

    def _check_open(self) -> None:
        if self._done:
            raise CraftVLAError(f"{self.root}: writer already finalized or aborted")

    def __enter__(self) -> LeRobotDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self._done:
            self.abort()
