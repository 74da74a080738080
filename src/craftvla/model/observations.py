"""What a raw observation may be before a policy acts on it, and what its actions must be after.

A robot (or anyone who can reach `craftvla serve`) hands `policy.infer` / `infer_batch` a dict of
NumPy arrays; these checks run there, so in-process users and the server refuse the same things:

- images: uint8 (H, W, 3), each side at least the patch grid (image_size / patch_size: smaller
  carries less than one pixel per patch) and at most `max_image_side` (resizing a 4096 x 4096 frame
  costs seconds of CPU);
- state: numbers of the policy's size, all finite, and within the training range widened by
  `state_tolerance` times its width on each side (a 1e30 or a state in the wrong units is refused,
  naming the dimension);
- task: a string of at most `max_task_chars` characters; longer ones are refused, and what is
  tokenised is cut to `task_chars_per_token` x `llm.max_text_tokens` characters first (the
  tokenizer truncates to max_text_tokens anyway; it no longer sees a megabyte to get there);
- actions: finite, or an error: non-finite numbers never reach a robot.
Every refusal is one CraftVLAError naming the observation, the key and the value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from craftvla.errors import CraftVLAError, require
from craftvla.keys import STATE_KEY, TASK_KEY


@dataclass
class ObservationLimits:
    """Bounds on raw observations (runtime settings of a processor; not saved with a checkpoint)."""

    # Largest image side accepted, pixels.
    max_image_side: int = 2048
    # A state dimension may lie outside the training data's [min, max] by this many times the
    # range's width (a constant dimension: by this many times max(|value|, 1)); None = no check.
    state_tolerance: Optional[float] = 10.0
    # Longest instruction accepted, characters.
    max_task_chars: int = 10_000
    # An instruction is cut to this many characters per token of llm.max_text_tokens before
    # tokenising (a token spans at least one character, and natural-language tokens far fewer than 32).
    task_chars_per_token: int = 32

    def __post_init__(self) -> None:
        require(self.max_image_side >= 1, "max_image_side", self.max_image_side, "must be >= 1")
        require(
            self.state_tolerance is None or self.state_tolerance >= 0,
            "state_tolerance",
            self.state_tolerance,
            "must be >= 0 (or null: no range check)",
        )
        require(self.max_task_chars >= 1, "max_task_chars", self.max_task_chars, "must be >= 1")
        require(self.task_chars_per_token >= 1, "task_chars_per_token", self.task_chars_per_token, "must be >= 1")


def state_bounds(stats: Optional[dict], tolerance: Optional[float]) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(low, high) per state dimension: the training [min, max] widened by `tolerance` widths; None
    without a tolerance or without min/max statistics."""
    state = (stats or {}).get(STATE_KEY, {})
    if tolerance is None or not {"min", "max"} <= set(state):
        return None
    low, high = np.asarray(state["min"], np.float64), np.asarray(state["max"], np.float64)
    width = high - low
    width = np.where(width > 0, width, np.maximum(np.abs(high), 1.0))  # (S,)
    return low - tolerance * width, high + tolerance * width


def _array(i: int, key: str, value: Any) -> np.ndarray:
    try:
        return np.asarray(value)
    except (ValueError, TypeError, OverflowError):  # ragged lists and the like
        raise CraftVLAError(f"observation {i}: {key} is a {type(value).__name__} that is not an array") from None


def check_image(i: int, key: str, image: Any, min_side: int, max_side: int) -> None:
    image = _array(i, key, image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise CraftVLAError(f"observation {i}: {key} is {image.dtype} {image.shape}; expected (H, W, 3) uint8")
    height, width = image.shape[:2]
    if min(height, width) < min_side or max(height, width) > max_side:
        raise CraftVLAError(
            f"observation {i}: {key} is {height} x {width}; each side must be in [{min_side}, {max_side}] "
            f"pixels (at least the policy's patch grid, at most max_image_side)"
        )


def check_state(i: int, state: Any, dim: int, bounds: Optional[tuple[np.ndarray, np.ndarray]]) -> None:
    array = _array(i, STATE_KEY, state)
    if array.dtype.kind not in "biuf" or array.shape != (dim,):
        raise CraftVLAError(
            f"observation {i}: {STATE_KEY} is {array.dtype} {array.shape}; the policy expects ({dim},) numbers"
        )
    values = array.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise CraftVLAError(f"observation {i}: {STATE_KEY}[{bad[0]}] is {values[bad[0]]}; every value must be finite")
    if bounds is not None:
        low, high = bounds
        out = np.flatnonzero((values < low) | (values > high))
        if out.size:
            d = out[0]
            raise CraftVLAError(
                f"observation {i}: {STATE_KEY}[{d}] = {values[d]:.6g} is far outside the training range "
                f"(accepted: [{low[d]:.6g}, {high[d]:.6g}]); check the robot's units, or raise state_tolerance"
            )


def check_task(i: int, task: Any, max_chars: int) -> None:
    if not isinstance(task, str):
        raise CraftVLAError(f"observation {i}: {TASK_KEY} is a {type(task).__name__}; expected the instruction string")
    if len(task) > max_chars:
        raise CraftVLAError(
            f"observation {i}: {TASK_KEY} has {len(task):,} characters; at most {max_chars:,} are accepted"
        )


def check_observations(
    observations: Sequence[dict[str, Any]], config, stats: Optional[dict], limits: ObservationLimits
) -> None:
    """Refuse (CraftVLAError naming the observation and key) anything the policy should not act on."""
    needed = [*config.camera_keys, STATE_KEY, TASK_KEY]
    min_side = max(config.vision.image_size // config.vision.patch_size, 1)
    bounds = state_bounds(stats, limits.state_tolerance)
    for i, obs in enumerate(observations):
        if not isinstance(obs, dict):
            raise CraftVLAError(f"observation {i} is a {type(obs).__name__}; expected a dict")
        missing = [k for k in needed if k not in obs]
        if missing:
            keys = sorted(map(str, obs))
            shown = keys[:20] + ([f"... {len(keys) - 20} more"] if len(keys) > 20 else [])
            raise CraftVLAError(
                f"observation {i} lacks {missing} (it has {shown}); expected "
                f"{needed}: images (H, W, 3) uint8, state ({config.state_dim},), instruction"
            )
        for key in config.camera_keys:
            check_image(i, key, obs[key], min_side, limits.max_image_side)
        check_state(i, obs[STATE_KEY], config.state_dim, bounds)
        check_task(i, obs[TASK_KEY], limits.max_task_chars)


def check_actions(actions: np.ndarray) -> np.ndarray:
    """The chunk (B, H, A) if every value is finite; else an error naming the observations."""
    bad = np.flatnonzero(~np.isfinite(actions).reshape(actions.shape[0], -1).all(axis=1))
    if bad.size:
        raise CraftVLAError(
            f"the policy produced non-finite actions for observation(s) {bad.tolist()}; refusing to return them"
        )
    return actions
