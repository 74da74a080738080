"""A PyTorch dataset over a LeRobot v3.0 directory (no `lerobot` dependency).

`ds[i]` is the frame with global index i: camera images at that frame, the state, the next
`chunk_size` actions of the same episode (delta timestamps k/fps, k = 0..H-1) with
`action_is_pad` past the episode end (padded rows repeat the last action, as LeRobot's
`_get_query_indices` clamps to the episode), and the instruction string.

Low-dimensional columns are loaded once into numpy at construction; video frames are decoded
per episode slice on first use and cached per worker (see `video.VideoFrameSource`).
Nothing is ever written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import av
import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import Dataset

from craftvla.errors import CraftVLAError
from craftvla.keys import ACTION_KEY

from .lerobot_meta import DEFAULT_FEATURES, STATS_PATH, DatasetMeta, load_meta, read_parquet
from .stats import load_stats
from .video import VideoFrameSource

BOOKKEEPING = ("index", "episode_index", "frame_index", "timestamp", "task_index")


def _column_to_numpy(column: pa.ChunkedArray, width: int, path: Path, key: str) -> np.ndarray:
    """A scalar, list or fixed-size-list parquet column -> (N, width) float32."""
    col = column.combine_chunks()
    if pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type) or pa.types.is_large_list(col.type):
        lengths = (
            col.value_lengths().to_numpy(zero_copy_only=False)
            if not pa.types.is_fixed_size_list(col.type)
            else np.full(len(col), col.type.list_size)
        )
        if len(col) and (lengths != width).any():
            bad = int(lengths[lengths != width][0])
            raise CraftVLAError(f"{path}: feature {key!r} has length {bad} but info.json says shape ({width},)")
        values = col.flatten().to_numpy(zero_copy_only=False)
    else:
        if width != 1:
            raise CraftVLAError(f"{path}: feature {key!r} is a scalar column but info.json says shape ({width},)")
        values = col.to_numpy(zero_copy_only=False)
    return values.astype(np.float32).reshape(len(col), width)


class LeRobotDataset(Dataset):
    """Frames of a v3.0 dataset as dicts of tensors (see module docstring for the keys).

    Args:
        root: dataset directory (with meta/info.json).
        chunk_size: H, number of future actions per item (including the current one).
        transform: optional callable item -> item (e.g. `transforms.Compose([...])`).
        video_cache_mb: per-worker budget for decoded episode frames (0 = decode each
            sample's episode slice anew; never the whole file).
    """

    def __init__(
        self,
        root: str | Path,
        chunk_size: int = 8,
        transform: Callable[[dict], dict] | None = None,
        video_cache_mb: float = 512.0,
    ) -> None:
        if chunk_size < 1:
            raise CraftVLAError(f"chunk_size={chunk_size}: must be >= 1")
        self.root = Path(root)
        self.chunk_size = chunk_size
        self.transform = transform
        self.meta: DatasetMeta = load_meta(self.root)
        images = [k for k, ft in self.meta.features.items() if ft["dtype"] == "image"]
        if images:  # LeRobot's use_videos=False layout: PNG bytes inside the parquet rows
            raise CraftVLAError(
                f"{self.root / 'meta/info.json'}: features {images} are stored as per-frame images "
                "(dtype 'image'); craftvla reads camera streams stored as video (dtype 'video', "
                "LeRobot's default): re-record with use_videos=True or encode them to mp4"
            )
        self.stats = load_stats(self.root / STATS_PATH)
        self._episodes = self._episode_arrays()
        self._vector_keys = [k for k in self._data_features() if k != ACTION_KEY]  # per-frame extras
        self._columns = self._load_data()
        self._video_files = self._check_video_files()
        self.frames = VideoFrameSource(cache_mb=video_cache_mb)

    # -- loading ----------------------------------------------------------------------------------

    def _episode_arrays(self) -> dict[str, np.ndarray]:
        """meta/episodes columns as numpy, indexed by position (== episode_index, checked)."""
        table = self.meta.episodes
        arrays = {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names if name != "tasks"}
        if (arrays["episode_index"] != np.arange(table.num_rows)).any():
            raise CraftVLAError(f"{self.root / 'meta/episodes'}: episode_index is not 0..{table.num_rows - 1}")
        return arrays

    def _data_features(self) -> dict[str, int]:
        """Non-video, non-bookkeeping features -> vector width."""
        return {
            k: int(np.prod(ft["shape"]))
            for k, ft in self.meta.features.items()
            if ft["dtype"] not in ("video", "image", "string") and k not in DEFAULT_FEATURES
        }

    def _load_file(self, path: Path, widths: dict[str, int]) -> dict[str, np.ndarray]:
        table = read_parquet(path)
        missing = [k for k in (*BOOKKEEPING, *widths) if k not in table.column_names]
        if missing:
            raise CraftVLAError(f"{path}: missing columns {missing} declared in meta/info.json")
        cols = {k: table[k].to_numpy() for k in BOOKKEEPING}
        for key, width in widths.items():
            cols[key] = _column_to_numpy(table[key], width, path, key)
            if not np.isfinite(cols[key]).all():
                row = int(np.argwhere(~np.isfinite(cols[key]))[0, 0])
                raise CraftVLAError(f"{path}: feature {key!r} has NaN/inf (index {int(cols['index'][row])})")
        return cols

    def _load_data(self) -> dict[str, np.ndarray]:
        """Every data parquet file referenced by an episode, concatenated and ordered by index."""
        ep = self._episodes
        files = sorted(set(zip(ep["data/chunk_index"].tolist(), ep["data/file_index"].tolist())))
        widths = self._data_features()
        parts = [self._load_file(self.meta.data_file(c, f), widths) for c, f in files]
        cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        order = np.argsort(cols["index"], kind="stable")
        cols = {k: v[order] for k, v in cols.items()}
        n = self.meta.total_frames
        if len(order) != n or (cols["index"] != np.arange(n)).any():
            raise CraftVLAError(
                f"{self.root / 'data'}: rows have index values that are not 0..{n - 1} "
                f"(found {len(order)} rows; meta/info.json total_frames={n})"
            )
        bounds_ok = (cols["episode_index"][ep["dataset_from_index"]] == ep["episode_index"]).all()
        if not bounds_ok or (ep["dataset_to_index"] - ep["dataset_from_index"] != ep["length"]).any():
            raise CraftVLAError(f"{self.root / 'meta/episodes'}: dataset_from/to_index disagree with the data rows")
        cols["timestamp"] = cols["timestamp"].astype(np.float64)
        drift = np.abs(cols["timestamp"] * self.meta.fps - cols["frame_index"])  # in frames
        if (drift > 0.4).any():
            row = int(np.argmax(drift > 0.4))
            raise CraftVLAError(
                f"{self.root / 'data'}: row index {row} (episode {int(cols['episode_index'][row])}) has timestamp "
                f"{cols['timestamp'][row]:.4f} s but frame_index {int(cols['frame_index'][row])} at "
                f"{self.meta.fps} fps; timestamps must be frame_index / fps"
            )
        return cols

    def _check_video_files(self) -> dict[str, list[Path]]:
        """Per camera, each episode's mp4 path. Every file must exist and hold a video stream of
        info.json's size, and every episode's time slice must lie inside its file (checked up front:
        a frame past the end would otherwise be clamped or repeated)."""
        out = {}
        for key in self.meta.camera_keys:
            needed = [f"videos/{key}/{c}" for c in ("chunk_index", "file_index", "from_timestamp", "to_timestamp")]
            missing = [c for c in needed if c not in self._episodes]
            if missing:
                raise CraftVLAError(f"{self.root / 'meta/episodes'}: missing columns {missing}")
            chunks, files = self._episodes[needed[0]], self._episodes[needed[1]]
            out[key] = [self.meta.video_file(key, int(c), int(f)) for c, f in zip(chunks, files)]
            durations = {path: self._probe_video(key, path) for path in sorted(set(out[key]))}
            self._check_slices(key, out[key], durations)
        return out

    def _probe_video(self, key: str, path: Path) -> float:
        """Open one mp4: it must exist and hold a video stream of info.json's (H, W); returns its
        duration in seconds."""
        if not path.is_file():
            raise CraftVLAError(f"{path}: video file not found (camera {key!r})")
        h, w, _ = self.meta.features[key]["shape"]
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise CraftVLAError(f"{path}: no video stream in the file (camera {key!r})")
                stream = container.streams.video[0]
                got = (stream.height, stream.width)
                if stream.duration is not None:
                    duration = float(stream.duration * stream.time_base)
                else:
                    duration = (container.duration or 0) / av.time_base
        except av.error.FFmpegError as err:
            raise CraftVLAError(f"{path}: not a readable video, truncated or not an mp4? ({err})") from None
        if got != (h, w):
            raise CraftVLAError(f"{path}: frames are {got[0]}x{got[1]} but meta/info.json says {key!r} is {h}x{w}")
        return duration

    def _check_slices(self, key: str, paths: list[Path], durations: dict[Path, float]) -> None:
        """Each episode's [from_timestamp, to_timestamp) must start at >= 0, span length / fps and end
        inside its video (half a frame of slack for container rounding)."""
        fps, ep = self.meta.fps, self._episodes
        start, end = ep[f"videos/{key}/from_timestamp"], ep[f"videos/{key}/to_timestamp"]
        for i, path in enumerate(paths):
            span, length = float(end[i] - start[i]), int(ep["length"][i])
            if start[i] < 0 or abs(span * fps - length) > 0.5:
                raise CraftVLAError(
                    f"{self.root / 'meta/episodes'}: episode {i} camera {key!r}: video slice [{start[i]:.4f}, "
                    f"{end[i]:.4f}) s does not hold its {length} frames at {fps} fps"
                )
            if end[i] > durations[path] + 0.5 / fps:
                raise CraftVLAError(
                    f"{path}: episode {i} needs frames up to {end[i]:.4f} s but the video lasts "
                    f"{durations[path]:.4f} s (camera {key!r})"
                )

    # -- items --------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.meta.total_frames

    def _image(self, key: str, ep: int, ts: float) -> torch.Tensor:
        """(3, H, W) float32 in [0, 1] of camera `key` at episode time `ts`."""
        path = self._video_files[key][ep]
        from_ts = float(self._episodes[f"videos/{key}/from_timestamp"][ep])
        frames = self.frames.episode_frames(path, from_ts, int(self._episodes["length"][ep]), self.meta.fps)
        h, w, _ = self.meta.features[key]["shape"]
        if frames.shape[1:] != (h, w, 3):
            raise CraftVLAError(f"{path}: frames are {frames.shape[1:]} but meta/info.json says {(h, w, 3)}")
        k = round(ts * self.meta.fps)  # the frame of this timestamp within the episode's slice
        if not 0 <= k < len(frames):
            raise CraftVLAError(
                f"{path}: timestamp {ts:.4f} s of episode {ep} lies outside its "
                f"{len(frames)} video frames (camera {key!r})"
            )
        frame = frames[k]  # (H, W, 3) uint8
        return torch.from_numpy(frame).permute(2, 0, 1).float().div_(255.0)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} frames")
        i = int(i) % len(self)
        c = self._columns
        ep = int(c["episode_index"][i])
        start, end = int(self._episodes["dataset_from_index"][ep]), int(self._episodes["dataset_to_index"][ep])
        query = i + np.arange(self.chunk_size)  # (H,) delta timestamps k/fps
        item: dict[str, Any] = {k: torch.from_numpy(c[k][i].copy()) for k in self._vector_keys}  # (S,)
        item[ACTION_KEY] = torch.from_numpy(c[ACTION_KEY][np.clip(query, start, end - 1)])  # (H, A)
        item["action_is_pad"] = torch.from_numpy(query >= end)  # (H,)
        ts = float(c["timestamp"][i])
        for key in self.meta.camera_keys:
            item[key] = self._image(key, ep, ts)
        item.update(
            task=self.meta.tasks[int(c["task_index"][i])],
            episode_index=ep,
            frame_index=int(c["frame_index"][i]),
            index=i,
            timestamp=ts,
        )
        return self.transform(item) if self.transform is not None else item

    def __repr__(self) -> str:
        m = self.meta
        return (
            f"LeRobotDataset({self.root}, episodes={m.total_episodes}, frames={m.total_frames}, "
            f"fps={m.fps}, cameras={m.camera_keys}, state_dim={m.state_dim}, action_dim={m.action_dim}, "
            f"chunk_size={self.chunk_size})"
        )
