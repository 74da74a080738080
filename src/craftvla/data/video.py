"""MP4 encode/decode with PyAV: many episodes per file, each a time slice [from_ts, to_ts).

Decoding never reads a whole file for one sample: `VideoFrameSource` seeks to the episode's
from_timestamp (the writer puts a keyframe there), decodes only that episode's frames, and
keeps decoded episodes in a per-process LRU cache bounded in megabytes. Open containers are
per process too and never pickled, so DataLoader workers each open their own lazily.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from craftvla.errors import CraftVLAError

# Encoder names per codec, tried in order; "av1" is LeRobot's default codec (libsvtav1).
ENCODERS = {"h264": ["libx264", "h264"], "av1": ["libsvtav1", "libaom-av1"]}
# Options: LeRobot encodes AV1 with g=2, crf=30, preset=12 (video_utils._get_codec_options /
# encode_video_frames); for H.264 we use the same crf with libx264's fast preset and no
# B-frames (simpler timestamps, cheaper seeks).
ENCODER_OPTIONS = {
    "libsvtav1": {"g": "2", "crf": "30", "preset": "12"},
    "libaom-av1": {"g": "2", "crf": "30", "cpu-used": "8"},
    "libx264": {"crf": "23", "preset": "veryfast", "bf": "0"},
    "h264": {"crf": "23", "preset": "veryfast", "bf": "0"},
}
PIX_FMT = "yuv420p"  # what LeRobot writes; needs even height and width


def _has_encoder(name: str) -> bool:
    try:
        av.Codec(name, "w")
        return True
    except Exception:  # noqa: BLE001 - PyAV raises several types for "unknown codec"
        return False


def pick_encoder(codec: str) -> str:
    """The first available encoder for "h264" or "av1"; CraftVLAError if this PyAV has none."""
    if codec not in ENCODERS:
        raise CraftVLAError(f"video_codec={codec!r}: expected one of {sorted(ENCODERS)}")
    for name in ENCODERS[codec]:
        if _has_encoder(name):
            return name
    raise CraftVLAError(f"video_codec={codec!r}: this PyAV/FFmpeg build has none of {ENCODERS[codec]}")


class VideoFileEncoder:
    """Appends RGB uint8 frames to one mp4; an episode starts on a forced keyframe."""

    def __init__(self, path: Path, fps: int, height: int, width: int, encoder: str) -> None:
        if height % 2 or width % 2:
            raise CraftVLAError(f"{path}: {PIX_FMT} video needs even height and width, got {height}x{width}")
        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints a banner per file otherwise
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._container = av.open(str(path), "w")
        self._stream = self._container.add_stream(encoder, rate=fps, options=ENCODER_OPTIONS.get(encoder, {}))
        self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, PIX_FMT
        self._stream.time_base = Fraction(1, fps)
        self.num_frames = 0  # frames written so far == pts of the next frame
        self.bytes_written = 0  # encoded bytes muxed so far (file size check)

    def add_episode(self, frames: np.ndarray) -> tuple[int, int]:
        """Encode (T, H, W, 3) uint8 frames; returns (first_frame, end_frame) in this file."""
        start = self.num_frames
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame.pts = self.num_frames
            if i == 0:  # a keyframe at each episode start makes the reader's seek exact
                frame.pict_type = av.video.frame.PictureType.I
            self._mux(self._stream.encode(frame))
            self.num_frames += 1
        return start, self.num_frames

    def _mux(self, packets) -> None:
        for packet in packets:
            self.bytes_written += packet.size
            self._container.mux(packet)

    def close(self) -> None:
        """Flush the encoder and close the file."""
        self._mux(self._stream.encode())
        self._container.close()


def video_info(path: Path) -> dict:
    """The feature "info" block LeRobot writes for a video (video_utils.get_video_info keys)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return {
            "video.height": stream.height,
            "video.width": stream.width,
            "video.codec": stream.codec_context.codec.canonical_name,
            "video.pix_fmt": stream.pix_fmt,
            "video.is_depth_map": False,
            "video.fps": int(stream.base_rate),
            "video.channels": 3,
            "has_audio": len(container.streams.audio) > 0,
        }


def decode_slice(container, path: Path, from_ts: float, num_frames: int, fps: int) -> np.ndarray:
    """Decode the frames at from_ts + k/fps, k < num_frames, from an open container.

    Frames are matched to slots by timestamp with a tolerance of 0.4 frame (codecs and
    containers round pts to their own time base). Returns (num_frames, H, W, 3) uint8.
    """
    stream = container.streams.video[0]
    tol = 0.4 / fps
    container.seek(max(int((from_ts - tol) / stream.time_base), 0), stream=stream, backward=True)
    out: list[np.ndarray | None] = [None] * num_frames
    for frame in container.decode(stream):
        if frame.time is None or frame.time < from_ts - tol:
            continue
        k = round((frame.time - from_ts) * fps)
        if k >= num_frames:
            break
        if abs(frame.time - (from_ts + k / fps)) <= tol:
            out[k] = frame.to_ndarray(format="rgb24")
    missing = [k for k, f in enumerate(out) if f is None]
    if missing:
        raise CraftVLAError(
            f"{path}: no frame within {tol:.4f}s of timestamp {from_ts + missing[0] / fps:.4f}s "
            f"({len(missing)} of {num_frames} frames of the slice starting at {from_ts:.4f}s missing)"
        )
    return np.stack(out)  # (T, H, W, 3)


# Containers a forked worker inherited from its parent, kept referenced for the child's lifetime.
# Freeing an FFmpeg decoder joins its frame threads; in a forked child those threads do not
# exist, so the join blocks forever while holding the GIL (measured here: a DataLoader worker
# hung whenever the parent had an unclosed threaded decoder that the child's garbage collector
# reached). So a child never frees what it inherited, and a parent always closes what it opened
# (`close`, also on `__del__`) instead of leaving decoders to the cyclic GC (PyAV containers
# and their streams form reference cycles).
_INHERITED_CONTAINERS: list = []


class VideoFrameSource:
    """Per-process video access: lazily opened containers and an LRU of decoded episodes.

    Not meant to be pickled: `__getstate__` returns an empty state, so every DataLoader worker
    starts with no open files and no cache.
    """

    def __init__(self, cache_mb: float = 512.0, max_open_files: int = 8) -> None:
        self.cache_mb = cache_mb  # per-process budget for decoded episode frames
        self.max_open_files = max_open_files  # open containers kept per process
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._containers: OrderedDict[Path, object] = OrderedDict()
        self._cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        self.decoded_slices = 0  # how many episode slices were decoded (cache misses)

    def __getstate__(self) -> dict:
        return {"cache_mb": self.cache_mb, "max_open_files": self.max_open_files}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def close(self) -> None:
        """Close the containers this process opened (inherited ones are only dropped)."""
        containers = getattr(self, "_containers", None)
        if not containers:
            return
        if os.getpid() != self._pid:
            _INHERITED_CONTAINERS.extend(containers.values())
        else:
            for container in containers.values():
                container.close()
        containers.clear()

    def __del__(self) -> None:
        self.close()

    def _container(self, path: Path):
        if os.getpid() != self._pid:  # forked after opening: never share FFmpeg handles
            self.close()
            self._pid = os.getpid()
        if path in self._containers:
            self._containers.move_to_end(path)
            return self._containers[path]
        try:
            container = av.open(str(path))
        except (av.error.FFmpegError, OSError) as err:
            raise CraftVLAError(f"{path}: cannot open video ({err})") from err
        self._containers[path] = container
        if len(self._containers) > self.max_open_files:
            self._containers.popitem(last=False)[1].close()
        return container

    def _drop(self, path: Path) -> None:
        """Close and forget one container (after a decode error its state is unknown)."""
        container = self._containers.pop(path, None)
        if container is not None:
            container.close()

    def episode_frames(self, path: Path, from_ts: float, num_frames: int, fps: int) -> np.ndarray:
        """(num_frames, H, W, 3) uint8 frames of one episode slice, from cache or decoded once."""
        key = (path, round(from_ts * fps), num_frames)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        try:
            frames = decode_slice(self._container(path), path, from_ts, num_frames, fps)
        except av.error.FFmpegError as err:  # e.g. a file truncated after its header
            self._drop(path)
            raise CraftVLAError(
                f"{path}: cannot decode the frames at {from_ts:.4f} s, truncated or corrupt? ({err})"
            ) from None
        self.decoded_slices += 1
        self._cache[key] = frames
        self._cache_bytes += frames.nbytes
        while self._cache_bytes > self.cache_mb * 2**20 and self._cache:
            self._cache_bytes -= self._cache.popitem(last=False)[1].nbytes
        return frames
