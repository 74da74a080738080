"""The closed-loop episode runner: B envs of one task in lockstep, action chunking, batched calls.

Every step, the envs whose action queue is empty are batched into one `predict_chunk` call
(one VLA forward for B envs instead of B); each gets its first `execute_steps` actions of the
predicted chunk of H and re-plans when they run out. An env that finishes starts the next
episode at once. Episode positions come from `episode_seed(seed, stream, task, index)`, so
they do not depend on `num_envs`; given the seed and `num_envs` the whole run is deterministic.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from craftvla.errors import ConfigError
from craftvla.keys import IMAGE_PREFIX, STATE_KEY

from .metaworld import MetaWorldEnv, episode_seed
from .policies import SimPolicy


@dataclass
class Episode:
    """One finished episode. `frames` (with `record=True`) pairs each observation with its action."""

    task: str  # Meta-World task name
    index: int  # episode index within the task (0, 1, ...)
    seed: int  # the seed its positions were drawn from
    success: bool  # reached the task's success condition within max_steps
    length: int  # env steps until success (or all steps taken, if it never succeeded)
    frames: list[dict[str, np.ndarray]] = field(default_factory=list)  # state, images, action per step
    video: list[np.ndarray] = field(default_factory=list)  # (H, W, 3) uint8 frames, if recorded


@dataclass
class _Slot:
    """An env's episode in progress."""

    episode: Episode
    obs: dict[str, Any]
    queue: deque = field(default_factory=deque)  # actions left from the last chunk
    steps: int = 0
    success_at: int | None = None  # step count when success was first reached


@dataclass
class RolloutSpec:
    """How episodes are run; shared by `collect` and `eval`."""

    seed: int = 0  # base seed; episode i of task t uses episode_seed(seed, stream, t, i)
    stream: int = 0  # seed stream: metaworld.COLLECT_STREAM or EVAL_STREAM
    max_steps: int = 200  # steps before an episode counts as failed
    execute_steps: int = 1  # actions executed from each predicted chunk before re-planning
    extra_steps: int = 0  # steps kept after success (collect: show the goal state a little)
    num_envs: int = 1  # envs stepped in lockstep (one batched policy call)
    image_size: int = 64  # rendered image size (pixels, square)
    cameras: tuple[str, ...] = ()  # cameras rendered every step (in addition to the policy's)
    record: bool = False  # keep state/images/action of every step in Episode.frames
    video_camera: str | None = None  # camera for Episode.video ...
    video_episodes: int = 0  # ... of episodes 0..video_episodes-1
    video_size: int = 0  # ... rendered at this size (its own renderer); 0 = the observations' images

    def __post_init__(self) -> None:
        for name in ("max_steps", "execute_steps", "num_envs", "image_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.extra_steps < 0 or self.video_episodes < 0:
            raise ConfigError(f"extra_steps={self.extra_steps}, video_episodes={self.video_episodes}: must be >= 0")


def run_episodes(policy: SimPolicy, task: str, episodes: int, spec: RolloutSpec) -> Iterator[Episode]:
    """Run `episodes` episodes of `task`; yields each as it finishes (deterministic order).

    Stopping early (breaking out of the loop) closes the envs.
    """
    if spec.execute_steps > policy.chunk_size and policy.chunk_size > 1:
        raise ConfigError(f"execute_steps={spec.execute_steps} exceeds the policy's chunk size {policy.chunk_size}")
    cameras = list(dict.fromkeys([*policy.cameras, *spec.cameras, *([spec.video_camera] if spec.video_camera else [])]))
    envs = [MetaWorldEnv(task, spec.image_size, cameras) for _ in range(min(spec.num_envs, episodes))]
    try:
        policy.reset()
        yield from _lockstep(policy, envs, task, episodes, spec)
    finally:
        for env in envs:
            env.close()


def _lockstep(
    policy: SimPolicy, envs: list[MetaWorldEnv], task: str, episodes: int, spec: RolloutSpec
) -> Iterator[Episode]:
    slots: list[_Slot | None] = [None] * len(envs)
    next_index = 0
    for i in range(len(envs)):
        slots[i], next_index = _start(envs[i], task, next_index, policy, spec), next_index + 1
    while any(s is not None for s in slots):
        _plan(policy, [s for s in slots if s is not None and not s.queue], spec)
        for i, slot in enumerate(slots):
            if slot is None or not _advance(envs[i], slot, spec):
                continue
            yield slot.episode
            slots[i] = _start(envs[i], task, next_index, policy, spec) if next_index < episodes else None
            next_index += 1


def _start(env: MetaWorldEnv, task: str, index: int, policy: SimPolicy, spec: RolloutSpec) -> _Slot:
    # Render only when someone looks: the policy, the recorder, or this episode's video.
    env.render_images = bool(policy.cameras) or spec.record or index < spec.video_episodes
    seed = episode_seed(spec.seed, spec.stream, task, index)
    episode = Episode(task=task, index=index, seed=seed, success=False, length=0)
    slot = _Slot(episode=episode, obs=env.reset(seed))
    _record_video(env, slot, spec)
    return slot


def _plan(policy: SimPolicy, needy: list[_Slot], spec: RolloutSpec) -> None:
    """One batched policy call for every env whose queue ran dry."""
    if not needy:
        return
    chunks = policy.predict_chunk([s.obs for s in needy])  # (B, H, 4)
    for slot, chunk in zip(needy, chunks):
        slot.queue.extend(chunk[: spec.execute_steps])


def _advance(env: MetaWorldEnv, slot: _Slot, spec: RolloutSpec) -> bool:
    """Step one env by one action; returns True when its episode is over."""
    action = slot.queue.popleft()
    if spec.record:
        frame = {k: v for k, v in slot.obs.items() if k == STATE_KEY or k.startswith(IMAGE_PREFIX)}
        slot.episode.frames.append({**frame, "action": np.clip(action, -1.0, 1.0).astype(np.float32)})
    slot.obs, success = env.step(action)
    slot.steps += 1
    _record_video(env, slot, spec)
    if success and slot.success_at is None:
        slot.success_at = slot.steps
    done = slot.steps >= spec.max_steps or (
        slot.success_at is not None and slot.steps - slot.success_at >= spec.extra_steps
    )
    if done:
        slot.episode.success = slot.success_at is not None
        slot.episode.length = slot.success_at if slot.success_at is not None else slot.steps
    return done


def _record_video(env: MetaWorldEnv, slot: _Slot, spec: RolloutSpec) -> None:
    if spec.video_camera and slot.episode.index < spec.video_episodes:
        size = spec.video_size or spec.image_size
        frame = (
            slot.obs[IMAGE_PREFIX + spec.video_camera]
            if size == spec.image_size
            else env.render_camera(spec.video_camera, size)
        )
        slot.episode.video.append(frame)
