"""Normalisation statistics in LeRobot's stats.json format.

Follows `src/lerobot/datasets/compute_stats.py`: per feature min/max/mean/std/count (+ q01/q99
here, as newer LeRobot writes quantiles); vectors reduce over frames, images over a frame
subsample per episode and over pixels, per channel, in [0, 1], shaped (3, 1, 1); episodes are
combined with the count-weighted parallel variance formula (`aggregate_feature_stats`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from craftvla.errors import CraftVLAError
from craftvla.files import read_json

QUANTILES = {"q01": 0.01, "q99": 0.99}


def sample_indices(length: int, min_samples: int = 100, max_samples: int = 10_000, power: float = 0.75) -> np.ndarray:
    """Evenly spaced frame indices for image stats (LeRobot's estimate_num_samples heuristic)."""
    n = max(min(length, min_samples), min(int(length**power), max_samples))
    return np.round(np.linspace(0, length - 1, n)).astype(int)


def vector_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """Stats of a (N, D) array over frames: each entry (D,), count (1,)."""
    values = np.asarray(values, dtype=np.float64)
    stats = {
        "min": values.min(axis=0),
        "max": values.max(axis=0),
        "mean": values.mean(axis=0),
        "std": values.std(axis=0),
        "count": np.array([len(values)]),
    }
    for name, q in QUANTILES.items():
        stats[name] = np.quantile(values, q, axis=0)
    return stats


def image_stats(frames: np.ndarray) -> dict[str, np.ndarray]:
    """Per-channel stats of (T, H, W, 3) uint8 frames in [0, 1]: each entry (3, 1, 1), count (1,)."""
    x = frames.astype(np.float64) / 255.0  # (T, H, W, 3)
    axes = (0, 1, 2)
    return {
        "min": x.min(axis=axes).reshape(3, 1, 1),
        "max": x.max(axis=axes).reshape(3, 1, 1),
        "mean": x.mean(axis=axes).reshape(3, 1, 1),
        "std": x.std(axis=axes).reshape(3, 1, 1),
        "count": np.array([len(frames)]),
    }


def aggregate(stats_list: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Combine per-episode stats of one feature (exact for min/max/mean/std/count).

    Quantiles cannot be combined exactly; callers that need them compute them from all values.
    """
    counts = np.stack([s["count"] for s in stats_list]).astype(np.float64)  # (E, 1)
    means = np.stack([s["mean"] for s in stats_list])  # (E, *shape)
    var = np.stack([s["std"] for s in stats_list]) ** 2
    w = counts.reshape(-1, *([1] * (means.ndim - 1)))  # (E, 1, ...) to broadcast
    total = counts.sum()
    mean = (means * w).sum(axis=0) / total
    variance = ((var + (means - mean) ** 2) * w).sum(axis=0) / total
    return {
        "min": np.stack([s["min"] for s in stats_list]).min(axis=0),
        "max": np.stack([s["max"] for s in stats_list]).max(axis=0),
        "mean": mean,
        "std": np.sqrt(variance),
        "count": np.array([int(total)]),
    }


def to_jsonable(stats: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, list]]:
    """Nested lists, as LeRobot's serialize_dict writes stats.json."""
    return {key: {name: np.asarray(v).tolist() for name, v in ft.items()} for key, ft in stats.items()}


def from_jsonable(raw: dict, source: str = "stats") -> dict[str, dict[str, np.ndarray]]:
    """stats.json content (or a checkpoint's copy) -> numpy arrays; counts stay integer."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, ft in raw.items():
        if not isinstance(ft, dict):
            raise CraftVLAError(f"{source}: entry {key!r} is not a dict of statistics")
        out[key] = {name: np.asarray(v, dtype=np.int64 if name == "count" else np.float32) for name, v in ft.items()}
    return out


def load_stats(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """meta/stats.json -> {feature: {stat: array}}; an absent file gives {}."""
    if not path.is_file():
        return {}
    return from_jsonable(read_json(path), str(path))
