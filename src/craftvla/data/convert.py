"""`craftvla convert rlds`: a TFDS/RLDS dataset -> a LeRobot v3.0 dataset, episode by episode.

    craftvla convert rlds --src ~/tensorflow_datasets/libero_spatial_no_noops/1.0.0 --out data/libero_spatial

Streams one episode (one TFRecord record) at a time into `LeRobotDatasetWriter`: images become
mp4 video, statistics are computed by the writer, tasks come from the instructions. Memory stays
bounded by one episode plus the writer's numeric columns. No TensorFlow (data/rlds.py reads the
shards). The default mapping follows the LIBERO / Open-X RLDS names; `--map` adds or overrides:

    steps/observation/<name>  (images)     -> observation.images.<name>
    steps/observation/state | proprio      -> observation.state
    steps/action                           -> action
    steps/language_instruction             -> the frame's task
      (or steps/observation/natural_language_instruction, as some Open-X datasets store it)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from craftvla.errors import ConfigError, CraftVLAError
from craftvla.keys import ACTION_KEY, IMAGE_PREFIX, STATE_KEY, TASK_KEY

from .rlds import Feature, RldsDataset

STATE_NAMES = ("steps/observation/state", "steps/observation/proprio")
INSTRUCTION_NAMES = ("steps/language_instruction", "steps/observation/natural_language_instruction")


@dataclass
class RldsConvertConfig:
    """Flags of `craftvla convert rlds`."""

    src: str = ""  # the TFDS dataset directory: dataset_info.json, features.json, *.tfrecord-NNNNN-of-NNNNN
    out: str = ""  # the LeRobot v3.0 dataset to create (a new or empty directory)
    split: str = "train"  # which split to convert
    # comma-separated RLDS=LeRobot pairs added to / overriding the defaults, e.g.
    # observation/image=observation.images.main (RLDS keys with or without "steps/", "." or "/")
    map: str = ""
    fps: int = 10  # frames per second for info.json and the videos (RLDS does not record it)
    robot_type: Optional[str] = None  # info.json's robot_type
    video_codec: str = "h264"  # h264 or av1
    max_episodes: int = 0  # convert only the first N episodes; 0 = all
    progress: bool = True  # a progress bar over episodes

    def __post_init__(self) -> None:
        if not self.src or not self.out:
            raise ConfigError("--src and --out are required")
        if self.fps < 1 or self.max_episodes < 0:
            raise ConfigError(f"--fps={self.fps} must be >= 1 and --max_episodes={self.max_episodes} >= 0")


def _rlds_key(name: str, features: dict[str, Feature]) -> str:
    """A user's RLDS key ("observation.image", "steps/observation/image", ...) -> features.json's."""
    for candidate in (name, name.replace(".", "/"), "steps/" + name, "steps/" + name.replace(".", "/")):
        if candidate in features:
            return candidate
    raise CraftVLAError(f"--map: RLDS feature {name!r} not found; the dataset has {sorted(features)}")


def feature_mapping(features: dict[str, Feature], overrides: str = "") -> dict[str, str]:
    """{RLDS key: LeRobot key} (TASK_KEY for the instruction): the defaults, then --map."""
    mapping = {
        k: IMAGE_PREFIX + k.rsplit("/", 1)[1]
        for k, f in features.items()
        if f.kind == "image" and k.startswith("steps/observation/")
    }
    state = next((k for k in STATE_NAMES if k in features), None)
    if state:
        mapping[state] = STATE_KEY
    if "steps/action" in features:
        mapping["steps/action"] = ACTION_KEY
    instruction = next((k for k in INSTRUCTION_NAMES if k in features), None)
    if instruction:
        mapping[instruction] = TASK_KEY
    for pair in filter(None, (p.strip() for p in overrides.split(","))):
        if "=" not in pair:
            raise ConfigError(f"--map {pair!r}: expected RLDS_KEY=LEROBOT_KEY")
        source, target = (s.strip() for s in pair.split("=", 1))
        key = _rlds_key(source, features)
        mapping = {k: v for k, v in mapping.items() if v != target}  # the new source replaces the default one
        mapping[key] = target
    if ACTION_KEY not in mapping.values():
        raise CraftVLAError(f"no action feature: map one with --map KEY=action (the dataset has {sorted(features)})")
    for key, target in mapping.items():
        if not key.startswith("steps/"):
            raise CraftVLAError(f"{key!r} is episode-level; only per-step features map to frames")
        if target.startswith(IMAGE_PREFIX) != (features[key].kind == "image"):
            raise CraftVLAError(f"--map {key}={target}: images map to {IMAGE_PREFIX}<name>, other features elsewhere")
    return mapping


def lerobot_features(features: dict[str, Feature], mapping: dict[str, str]) -> dict[str, dict]:
    """The writer's feature dict for the mapped RLDS features."""
    out = {}
    for key, target in mapping.items():
        f = features[key]
        if target == TASK_KEY:
            continue
        if f.kind == "image":
            out[target] = {"dtype": "video", "shape": f.shape, "names": ["height", "width", "channels"]}
        elif f.kind == "tensor" and len(f.shape) <= 1:
            dtype = "float32" if f.dtype in ("float16", "float32", "float64") else f.dtype
            out[target] = {"dtype": dtype, "shape": f.shape or (1,), "names": None}
        else:
            raise CraftVLAError(f"{key!r} ({f.kind} {f.dtype} {f.shape}) cannot be a LeRobot frame column")
    return out


def convert_rlds(cfg: RldsConvertConfig) -> dict:
    """Convert; returns {"episodes", "frames", "out"}."""
    from tqdm import tqdm

    from .writer import LeRobotDatasetWriter

    dataset = RldsDataset(cfg.src)
    mapping = feature_mapping(dataset.features, cfg.map)
    columns = lerobot_features(dataset.features, mapping)
    total = dataset.num_episodes(cfg.split) if cfg.split in dataset.splits else None
    if cfg.max_episodes:
        total = min(total or cfg.max_episodes, cfg.max_episodes)
    writer = LeRobotDatasetWriter(
        cfg.out, fps=cfg.fps, features=columns, robot_type=cfg.robot_type, video_codec=cfg.video_codec
    )
    episodes = frames = 0
    with writer, tqdm(total=total, unit="ep", desc="convert", disable=not cfg.progress) as bar:
        for episode in dataset.episodes(cfg.split, keys=list(mapping)):
            frames += _write_episode(writer, episode, mapping, columns)
            episodes += 1
            bar.update(1)
            if cfg.max_episodes and episodes >= cfg.max_episodes:
                break
        if not episodes:
            raise CraftVLAError(f"{cfg.src}: split {cfg.split!r} holds no episodes")
        root = writer.finalize()
    return {"episodes": episodes, "frames": frames, "out": str(root)}


def _write_episode(writer, episode: dict, mapping: dict[str, str], columns: dict[str, dict]) -> int:
    lengths = {k: len(v) for k, v in episode.items()}
    if len(set(lengths.values())) != 1:
        raise CraftVLAError(f"an episode's features have different step counts: {lengths}")
    n = next(iter(lengths.values()))
    tasks = episode.get(next((k for k, v in mapping.items() if v == TASK_KEY), ""), [""] * n)
    for t in range(n):
        frame = {}
        for key, target in mapping.items():
            if target == TASK_KEY:
                continue
            value = episode[key][t]
            frame[target] = (
                value
                if columns[target]["dtype"] == "video"
                else np.asarray(value, dtype=columns[target]["dtype"]).reshape(columns[target]["shape"])
            )
        writer.add_frame(frame, task=tasks[t])
    writer.save_episode()
    return n


def main(argv: list[str]) -> int:
    """CLI entry: `craftvla convert rlds --src DIR --out DIR [...]`."""
    from craftvla.cli import run_sub_verb

    return run_sub_verb(
        "convert", argv, {"rlds": (_rlds_main, "a TFDS/RLDS dataset (TFRecord shards) -> LeRobot v3.0")}
    )


def _rlds_main(argv: list[str]) -> int:
    from craftvla.cli.parsing import parse_config

    cfg = parse_config(RldsConvertConfig, args=argv, prog="craftvla convert rlds")
    result = convert_rlds(cfg)
    print(f"converted {result['episodes']} episodes ({result['frames']} frames) to {Path(result['out'])}")
    return 0
