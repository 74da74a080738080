"""`craftvla collect`: scripted-expert demonstrations in Meta-World, written as a LeRobot v3.0 dataset.

    craftvla collect --tasks drawer-close-v3,button-press-topdown-v3 --episodes 50 --out data/mw

Each step records the camera image(s) (uint8 RGB), the proprio state (end-effector xyz +
gripper opening), the expert's 4-D action (clipped to [-1, 1], as the env applies it) and the
task's instruction sentence. An episode ends `extra_steps` after success or at `max_steps`;
failed episodes are dropped unless `--keep_failed true`. Positions come from the collection
seed stream (`metaworld.COLLECT_STREAM`), so `craftvla eval` with any seed sees unseen positions.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from craftvla.cli.parsing import parse_config
from craftvla.errors import ConfigError, CraftVLAError
from craftvla.keys import IMAGE_PREFIX, STATE_KEY

from .metaworld import (
    ACTION_NAMES,
    COLLECT_STREAM,
    DEFAULT_CAMERA,
    DEFAULT_TASKS,
    STATE_NAMES,
    control_fps,
    instruction,
    parse_cameras,
    parse_tasks,
)
from .policies import ExpertPolicy
from .rollout import Episode, RolloutSpec, run_episodes


@dataclass
class CollectConfig:
    """Flags of `craftvla collect`."""

    out: str = ""  # output dataset directory (must not exist or be empty)
    env: str = "metaworld"  # simulator (only Meta-World for now)
    tasks: str = ",".join(DEFAULT_TASKS)  # comma-separated Meta-World task names
    episodes: int = 50  # episodes to keep per task
    image_size: int = 64  # rendered image height = width (pixels)
    cameras: str = DEFAULT_CAMERA  # comma-separated camera names (corner, corner2, ..., topview)
    seed: int = 0  # base seed of the episodes' object/goal positions (collection stream)
    max_steps: int = 200  # an episode not solved in this many steps counts as failed
    extra_steps: int = 5  # steps still recorded after success (the goal state, held)
    keep_failed: bool = False  # also keep episodes the expert did not solve
    max_attempts: int = 0  # episodes tried per task before giving up; 0 = 2 * episodes + 10
    video_codec: str = "h264"  # codec of the dataset's mp4 files (h264 or av1)

    def __post_init__(self) -> None:
        if not self.out:
            raise ConfigError("--out: required (the dataset directory to create)")
        if self.env != "metaworld":
            raise ConfigError(f"--env={self.env!r}: only 'metaworld' is supported")
        for name in ("episodes", "image_size", "max_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name}={getattr(self, name)}: must be >= 1")
        if self.extra_steps < 0 or self.max_attempts < 0:
            raise ConfigError(f"--extra_steps={self.extra_steps}, --max_attempts={self.max_attempts}: must be >= 0")
        if self.max_attempts and self.max_attempts < self.episodes:
            raise ConfigError(f"--max_attempts={self.max_attempts} is below --episodes={self.episodes}")

    @property
    def attempts(self) -> int:
        """Episodes tried per task at most (failures included)."""
        if self.keep_failed:
            return self.episodes
        return self.max_attempts or 2 * self.episodes + 10


def dataset_features(cameras: list[str], image_size: int) -> dict[str, dict]:
    """The LeRobot feature spec of a Meta-World dataset: one video per camera, state, action."""
    features = {
        IMAGE_PREFIX + cam: {
            "dtype": "video",
            "shape": (image_size, image_size, 3),
            "names": ["height", "width", "channels"],
        }
        for cam in cameras
    }
    features[STATE_KEY] = {"dtype": "float32", "shape": (len(STATE_NAMES),), "names": list(STATE_NAMES)}
    features["action"] = {"dtype": "float32", "shape": (len(ACTION_NAMES),), "names": list(ACTION_NAMES)}
    return features


def collect(cfg: CollectConfig) -> dict[str, dict[str, int]]:
    """Run the experts and write the dataset to `cfg.out`; returns {task: {kept, tried, solved}}."""
    tasks, cameras = parse_tasks(cfg.tasks), parse_cameras(cfg.cameras)
    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # fail before minutes of simulation
        raise CraftVLAError(f"--out {out}: already exists and is not empty; refusing to overwrite")
    from craftvla.data import LeRobotDatasetWriter

    spec = RolloutSpec(
        seed=cfg.seed,
        stream=COLLECT_STREAM,
        max_steps=cfg.max_steps,
        extra_steps=cfg.extra_steps,
        image_size=cfg.image_size,
        cameras=tuple(cameras),
        record=True,
    )
    features = dataset_features(cameras, cfg.image_size)
    summary = {}
    with LeRobotDatasetWriter(
        out, fps=control_fps(tasks[0]), features=features, robot_type="sawyer", video_codec=cfg.video_codec
    ) as writer:
        for task in tasks:
            summary[task] = _collect_task(writer, task, cfg, spec)
        writer.finalize()
    return summary


def _collect_task(writer, task: str, cfg: CollectConfig, spec: RolloutSpec) -> dict[str, int]:
    counts = {"kept": 0, "tried": 0, "solved": 0}
    with tqdm(total=cfg.episodes, desc=task, unit="ep", file=sys.stderr) as bar:
        for episode in run_episodes(ExpertPolicy(), task, cfg.attempts, spec):
            counts["tried"] += 1
            counts["solved"] += episode.success
            if episode.success or cfg.keep_failed:
                _write_episode(writer, episode, instruction(task))
                counts["kept"] += 1
                bar.update(1)
            bar.set_postfix(solved=f"{counts['solved']}/{counts['tried']}")
            if counts["kept"] == cfg.episodes:
                break
    if counts["kept"] < cfg.episodes:
        tqdm.write(
            f"warning: {task}: the expert solved only {counts['solved']} of {counts['tried']} episodes; "
            f"kept {counts['kept']} (asked for {cfg.episodes})",
            file=sys.stderr,
        )
    return counts


def _write_episode(writer, episode: Episode, task_text: str) -> None:
    for frame in episode.frames:
        writer.add_frame(frame, task=task_text)
    writer.save_episode()


def main(argv: list[str]) -> int:
    """CLI entry: parse flags, collect, print a one-line summary per task."""
    cfg = parse_config(CollectConfig, args=argv, prog="craftvla collect")
    summary = collect(cfg)
    for task, c in summary.items():
        print(f"{task}: kept {c['kept']} episodes (expert solved {c['solved']}/{c['tried']})")
    print(f"dataset written to {cfg.out}")
    return 0
