"""The LeRobot v3.0 on-disk layout: path templates, info.json keys, and metadata loading.

Every key name here was checked against LeRobot's own source (huggingface/lerobot):
- path templates, default chunk/file sizes and the info.json keys: `src/lerobot/datasets/utils.py`
  (`DEFAULT_DATA_PATH`, `DEFAULT_VIDEO_PATH`, `DEFAULT_EPISODES_PATH`, `DEFAULT_TASKS_PATH`,
  `DEFAULT_CHUNK_SIZE` = 1000, `DEFAULT_DATA_FILE_SIZE_IN_MB` = 100,
  `DEFAULT_VIDEO_FILE_SIZE_IN_MB` = 500, `create_empty_dataset_info`, `DEFAULT_FEATURES`,
  `update_chunk_file_indices`);
- the per-episode columns (`episode_index`, `tasks`, `length`, `data/chunk_index`,
  `data/file_index`, `dataset_from_index`, `dataset_to_index`, `videos/<key>/chunk_index`,
  `videos/<key>/file_index`, `videos/<key>/from_timestamp`, `videos/<key>/to_timestamp`,
  `meta/episodes/chunk_index`, `meta/episodes/file_index`, `stats/<key>/<stat>`):
  `src/lerobot/datasets/dataset_metadata.py` (`save_episode`, `_save_episode_metadata`) and
  `aggregate.py`;
- tasks.parquet = a pandas frame with the task string as index (named "task") and a
  `task_index` column: `dataset_metadata.py` (`save_episode_tasks`);
- the video feature's "info" block: `video_utils.py` (`get_video_info`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from craftvla.errors import CraftVLAError
from craftvla.files import read_json
from craftvla.keys import ACTION_KEY, STATE_KEY

CODEBASE_VERSION = "v3.0"
INFO_PATH = "meta/info.json"
STATS_PATH = "meta/stats.json"
TASKS_PATH = "meta/tasks.parquet"
EPISODES_DIR = "meta/episodes"
CHUNK_FILE = "chunk-{chunk_index:03d}/file-{file_index:03d}"
EPISODES_PATH = EPISODES_DIR + "/" + CHUNK_FILE + ".parquet"
DATA_PATH = "data/" + CHUNK_FILE + ".parquet"
VIDEO_PATH = "videos/{video_key}/" + CHUNK_FILE + ".mp4"
DEFAULT_CHUNKS_SIZE = 1000  # files per chunk directory (LeRobot DEFAULT_CHUNK_SIZE)
DEFAULT_DATA_FILE_SIZE_IN_MB = 100
DEFAULT_VIDEO_FILE_SIZE_IN_MB = 500

# Bookkeeping columns LeRobot adds to every dataset (utils.DEFAULT_FEATURES).
DEFAULT_FEATURES: dict[str, dict[str, Any]] = {
    "timestamp": {"dtype": "float32", "shape": [1], "names": None},
    "frame_index": {"dtype": "int64", "shape": [1], "names": None},
    "episode_index": {"dtype": "int64", "shape": [1], "names": None},
    "index": {"dtype": "int64", "shape": [1], "names": None},
    "task_index": {"dtype": "int64", "shape": [1], "names": None},
}


def next_chunk_file(chunk_index: int, file_index: int, chunks_size: int) -> tuple[int, int]:
    """The (chunk, file) pair after this one: files fill a chunk directory, then a new chunk."""
    if file_index == chunks_size - 1:
        return chunk_index + 1, 0
    return chunk_index, file_index + 1


@dataclass
class DatasetMeta:
    """Parsed meta/ of a v3.0 dataset (what the reader and the trainer need)."""

    root: Path  # dataset directory
    info: dict[str, Any]  # meta/info.json as written
    tasks: list[str]  # task strings, position == task_index
    episodes: pa.Table  # meta/episodes rows (without stats/ columns), sorted by episode_index
    fps: int = field(init=False)
    features: dict[str, dict[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        self.fps = int(self.info["fps"])
        self.features = self.info["features"]

    @property
    def camera_keys(self) -> list[str]:
        """Video features, "observation.images.<camera>", in info.json order."""
        return [k for k, ft in self.features.items() if ft["dtype"] == "video"]

    @property
    def state_dim(self) -> int:
        """Length of observation.state (0 when the dataset has none)."""
        ft = self.features.get(STATE_KEY)
        return int(ft["shape"][0]) if ft else 0

    @property
    def action_dim(self) -> int:
        """Length of the action vector."""
        return int(self.features[ACTION_KEY]["shape"][0])

    @property
    def total_episodes(self) -> int:
        return int(self.info["total_episodes"])

    @property
    def total_frames(self) -> int:
        return int(self.info["total_frames"])

    def data_file(self, chunk_index: int, file_index: int) -> Path:
        """Absolute path of a data parquet file."""
        return self.root / self.info["data_path"].format(chunk_index=chunk_index, file_index=file_index)

    def video_file(self, video_key: str, chunk_index: int, file_index: int) -> Path:
        """Absolute path of one camera's mp4 file."""
        rel = self.info["video_path"].format(video_key=video_key, chunk_index=chunk_index, file_index=file_index)
        return self.root / rel


def read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    """Read a parquet file; a missing or unreadable file is a CraftVLAError naming it."""
    if not path.is_file():
        raise CraftVLAError(f"{path}: file not found")
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError, KeyError) as err:
        raise CraftVLAError(f"{path}: cannot read parquet ({err})") from err


def check_info(info: dict[str, Any], path: Path) -> None:
    """Validate the info.json keys this package relies on; errors name the file and the key."""
    if not isinstance(info, dict):
        raise CraftVLAError(f"{path}: expected a JSON object, got {type(info).__name__}")
    version = info.get("codebase_version")
    if isinstance(version, str) and version.startswith("v2"):
        raise CraftVLAError(
            f"{path}: codebase_version {version!r} is the old LeRobot layout (one parquet/mp4 per "
            "episode); convert it to v3.0 with LeRobot's script (lerobot>=0.4): `python -m lerobot.datasets.v30."
            "convert_dataset_v21_to_v30 --repo-id=<id> --root=<this directory> --push-to-hub=false`"
        )
    if version != CODEBASE_VERSION:
        raise CraftVLAError(f"{path}: unknown codebase_version {version!r}; expected {CODEBASE_VERSION!r}")
    for key in ("fps", "features", "data_path", "total_episodes", "total_frames"):
        if key not in info:
            raise CraftVLAError(f"{path}: missing key {key!r}")
    fps = info["fps"]
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or fps <= 0 or fps != int(fps):
        raise CraftVLAError(f"{path}: fps={fps!r}; expected a positive whole number of frames per second")
    for key in ("total_episodes", "total_frames"):
        if isinstance(info[key], bool) or not isinstance(info[key], int) or info[key] < 1:
            raise CraftVLAError(f"{path}: {key}={info[key]!r}; expected a positive integer")
    _check_features(info["features"], path)
    has_video = any(ft.get("dtype") == "video" for ft in info["features"].values())
    if has_video and not info.get("video_path"):
        raise CraftVLAError(f"{path}: video features but no 'video_path' template")


def _check_features(features: Any, path: Path) -> None:
    """Each feature is {"dtype": str, "shape": [ints > 0]}; videos are (H, W, 3); there is an action."""
    if not isinstance(features, dict):
        raise CraftVLAError(f"{path}: 'features' must be a JSON object, got {type(features).__name__}")
    if ACTION_KEY not in features:
        raise CraftVLAError(f"{path}: features has no {ACTION_KEY!r} entry")
    for key, ft in features.items():
        shape = ft.get("shape") if isinstance(ft, dict) else None
        if (
            not isinstance(ft, dict)
            or not isinstance(ft.get("dtype"), str)
            or not isinstance(shape, list)
            or not shape
            or not all(isinstance(n, int) and n > 0 for n in shape)
        ):
            raise CraftVLAError(f"{path}: features[{key!r}] = {ft!r}; expected a dtype and a list of positive sizes")
        if ft["dtype"] == "video" and (len(shape) != 3 or shape[2] != 3):
            raise CraftVLAError(f"{path}: features[{key!r}] is a video of shape {shape}; expected [height, width, 3]")


def _is_text(dtype: pa.DataType) -> bool:
    """string, large_string (what pandas 2+ / pyarrow write for LeRobot's task index) or string_view."""
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype)


def _task_column(table: pa.Table, path: Path) -> str:
    """The task-string column: "task", else the pandas index column ("__index_level_0__" when
    LeRobot's index is unnamed), else the table's only text column."""
    text = [f.name for f in table.schema if f.name != "task_index" and _is_text(f.type)]
    pandas_meta = json.loads((table.schema.metadata or {}).get(b"pandas", b"{}"))
    index_cols = [c for c in pandas_meta.get("index_columns", []) if isinstance(c, str) and c in text]
    for choice in (["task"] if "task" in text else []) + index_cols + (text if len(text) == 1 else []):
        return choice
    raise CraftVLAError(
        f"{path}: expected a task string column and a 'task_index' column, got "
        f"{[f'{f.name}: {f.type}' for f in table.schema]}"
    )


def load_tasks(path: Path) -> list[str]:
    """meta/tasks.parquet -> task strings ordered by task_index.

    LeRobot writes it from pandas with the task string as the index (`save_episode_tasks`);
    pyarrow sees that index as a column: "task" when named, "__index_level_0__" (large_string)
    as lerobot 0.4.4 writes it (tests/data/fixtures/lerobot_v30).
    """
    table = read_parquet(path)
    if "task_index" not in table.column_names or not pa.types.is_integer(table.schema.field("task_index").type):
        raise CraftVLAError(f"{path}: expected an integer 'task_index' column, got {table.column_names}")
    col = _task_column(table, path)
    pairs = sorted(zip(table["task_index"].to_pylist(), table[col].to_pylist()))
    if [i for i, _ in pairs] != list(range(len(pairs))):
        raise CraftVLAError(f"{path}: task_index values are not 0..{len(pairs) - 1}")
    if not all(isinstance(t, str) and t for _, t in pairs):
        raise CraftVLAError(f"{path}: empty or missing task strings in column {col!r}")
    return [t for _, t in pairs]


def load_episodes(root: Path) -> pa.Table:
    """All meta/episodes/chunk-*/file-*.parquet rows (stats/ columns dropped), by episode_index."""
    paths = sorted((root / EPISODES_DIR).glob("chunk-*/file-*.parquet"))
    if not paths:
        raise CraftVLAError(f"{root / EPISODES_DIR}: no episode metadata files (chunk-*/file-*.parquet)")
    tables = []
    for p in paths:
        try:
            names = pq.read_schema(p).names
        except (pa.ArrowException, OSError) as err:
            raise CraftVLAError(f"{p}: cannot read parquet ({err})") from None
        tables.append(read_parquet(p, [n for n in names if not n.startswith("stats/")]))
    try:
        table = pa.concat_tables(tables, promote_options="default")
    except pa.ArrowException as err:
        raise CraftVLAError(f"{root / EPISODES_DIR}: episode files have incompatible schemas ({err})") from err
    required = [
        "episode_index",
        "length",
        "data/chunk_index",
        "data/file_index",
        "dataset_from_index",
        "dataset_to_index",
    ]
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise CraftVLAError(f"{paths[0]}: episode metadata lacks columns {missing}")
    return table.sort_by("episode_index")


def load_meta(root: str | Path) -> DatasetMeta:
    """Read and validate meta/ of a v3.0 dataset at `root` (never writes anything)."""
    root = Path(root)
    if not root.is_dir():
        raise CraftVLAError(f"{root}: dataset directory not found")
    info_path = root / INFO_PATH
    info = read_json(info_path)
    check_info(info, info_path)
    meta = DatasetMeta(root=root, info=info, tasks=load_tasks(root / TASKS_PATH), episodes=load_episodes(root))
    if meta.episodes.num_rows != meta.total_episodes:
        raise CraftVLAError(
            f"{info_path}: total_episodes={meta.total_episodes} but meta/episodes has {meta.episodes.num_rows} rows"
        )
    return meta
