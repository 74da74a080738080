"""Synthetic LeRobot v3.0 datasets whose contents encode (episode, frame) for checking slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from craftvla.data import LeRobotDatasetWriter

CAM = "observation.images.corner"
H, W = 48, 64


def features(h: int = H, w: int = W) -> dict:
    return {
        CAM: {"dtype": "video", "shape": (h, w, 3), "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": (4,), "names": ["x", "y", "z", "gripper"]},
        "action": {"dtype": "float32", "shape": (4,), "names": ["dx", "dy", "dz", "gripper"]},
    }


def image(ep: int, frame: int, h: int = H, w: int = W) -> np.ndarray:
    """Smooth image: red = 40 * episode, green = 8 * frame, blue = a horizontal ramp."""
    img = np.empty((h, w, 3), np.uint8)
    img[..., 0] = 20 + 40 * ep
    img[..., 1] = 8 * frame
    img[..., 2] = np.linspace(30, 220, w).astype(np.uint8)[None, :]
    return img


def state(ep: int, frame: int) -> np.ndarray:
    return np.array([ep, frame, 0.5 * frame, -ep], np.float32)


def action(ep: int, frame: int) -> np.ndarray:
    return np.array([1000 * ep + frame, 0.1 * frame, np.sin(frame), 1.0], np.float32)


def write_dataset(root: Path, lengths: list[int], codec: str = "h264", **kwargs) -> Path:
    """Episode e has lengths[e] frames and task "task {e % 2}"."""
    w = LeRobotDatasetWriter(root, fps=10, features=features(), robot_type="sawyer", video_codec=codec, **kwargs)
    for ep, n in enumerate(lengths):
        for f in range(n):
            frame = {CAM: image(ep, f), "observation.state": state(ep, f), "action": action(ep, f)}
            w.add_frame(frame, task=f"task {ep % 2}")
        w.save_episode()
    return w.finalize()


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Snapshot of every file under root (size, mtime) to prove nothing was written."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}
