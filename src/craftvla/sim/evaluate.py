"""`craftvla eval`: closed-loop success rates in Meta-World, with episode videos.

    craftvla eval --checkpoint runs/x/checkpoints/last --tasks drawer-close-v3 --episodes 20
    craftvla eval --policy expert --tasks drawer-close-v3 --episodes 20

Writes DIR/results.json (DIR: --out, by default runs/eval/<checkpoint or policy>/<tasks>: never
inside the checkpoint)
    {"tasks": {"<task>": {"success_rate": float, "episodes": int, "mean_length": float,
                          "instruction": str, "seen_in_training": bool | null}},
     "mean_success_rate": float,          # over every task
     "seen": {"tasks": [...], "mean_success_rate": float | null},    # tasks whose instruction the
     "unseen": {"tasks": [...], "mean_success_rate": float | null},  # policy was trained on, and not
     "policy": {...}, "training_tasks": [...] | null, "settings": {...}}
plus DIR/episodes.json (per-episode seed, success, length) and DIR/videos/<task>_ep<i>_<outcome>.mp4
(at least 128 px, at the control rate: one frame per 12.5 ms step, real time).
Positions come from the evaluation seed stream (`metaworld.EVAL_STREAM`): never those `collect`
trained on, whatever the two seeds. `evaluate(...)` is the same thing as a function, for the
training loop and the demo.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from craftvla.cli.parsing import parse_config
from craftvla.errors import ConfigError, CraftVLAError
from craftvla.files import atomic_path, write_json_atomic
from craftvla.keys import API_KEY_ENV

from .metaworld import DEFAULT_CAMERA, DEFAULT_TASKS, EVAL_STREAM, control_fps, instruction, parse_cameras, parse_tasks
from .policies import CheckpointPolicy, ExpertPolicy, RandomPolicy, ServerPolicy, SimPolicy
from .rollout import Episode, RolloutSpec, run_episodes

POLICIES = ("checkpoint", "server", "expert", "random")


@dataclass
class EvalConfig:
    """Flags of `craftvla eval`."""

    out: str = ""  # output directory for results.json, episodes.json and videos/; "" = runs/eval/<checkpoint>/<tasks>
    # a save_pretrained directory (--policy checkpoint); the default is where `craftvla train` writes by default
    checkpoint: str = "runs/train/checkpoints/last"
    env: str = "metaworld"  # simulator (only Meta-World for now)
    tasks: str = ",".join(DEFAULT_TASKS)  # comma-separated Meta-World task names
    episodes: int = 20  # episodes per task
    policy: str = "checkpoint"  # checkpoint | server (a running `craftvla serve`) | expert | random (reference rows)
    server: str = "ws://127.0.0.1:8000"  # with --policy server: the server's address
    api_key: str = ""  # with --policy server: its API key, if it requires one; "" = $CRAFTVLA_API_KEY
    execute_steps: int = 0  # actions executed per predicted chunk before re-planning; 0 = H // 2
    seed: int = 0  # base seed of positions (evaluation stream: disjoint from collect's)
    num_videos: int = 2  # episodes per task saved as mp4
    max_steps: int = 200  # an episode not solved in this many steps counts as failed
    num_envs: int = 5  # envs stepped in lockstep; their observations form one policy batch
    image_size: int = 0  # render size; 0 = the checkpoint's image size (64 for expert/random)
    camera: str = DEFAULT_CAMERA  # video camera when the policy reads no images
    device: str = "cpu"  # torch device of the checkpoint policy
    compile: bool = False  # torch.compile the policy's inference path (the first chunk pays the compilation)
    precision: str = "auto"  # inference autocast: auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32
    overwrite: bool = False  # replace an existing DIR/results.json

    def __post_init__(self) -> None:
        if self.env != "metaworld":
            raise ConfigError(f"--env={self.env!r}: only 'metaworld' is supported")
        if self.policy not in POLICIES:
            raise ConfigError(f"--policy={self.policy!r}: expected one of {', '.join(POLICIES)}")
        if self.policy == "checkpoint" and not self.checkpoint:
            raise ConfigError("--checkpoint: required with --policy checkpoint (or use --policy expert|random)")
        for name in ("episodes", "max_steps", "num_envs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name}={getattr(self, name)}: must be >= 1")
        for name in ("execute_steps", "num_videos", "image_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name}={getattr(self, name)}: must be >= 0")
        self.out = self.out or str(default_out(self.policy, self.checkpoint, parse_tasks(self.tasks)))
        inside = Path(self.checkpoint).resolve() in (Path(self.out).resolve(), *Path(self.out).resolve().parents)
        if self.policy == "checkpoint" and inside:
            raise ConfigError(
                f"--out={self.out!r}: inside the checkpoint {self.checkpoint}; results go in a "
                "directory of their own (leave --out unset for runs/eval/...)"
            )


def default_out(policy: str, checkpoint: str, tasks: list[str]) -> Path:
    """runs/eval/<what was evaluated>/<tasks>: `runs/train/checkpoints/last` -> runs/eval/runs-train-last/...,
    the expert -> runs/eval/expert/...; up to three tasks by name, more by count and a hash of the list."""
    if policy == "checkpoint":
        parts = [p for p in Path(checkpoint).parts if p not in ("checkpoints", "/", ".", "..")]
        name = "-".join(parts) or "checkpoint"
    else:
        name = policy
    short = [t.removesuffix("-v3") for t in tasks]
    digest = hashlib.sha1(",".join(tasks).encode()).hexdigest()[:8]
    return Path("runs") / "eval" / name / ("+".join(short) if len(short) <= 3 else f"{len(short)}-tasks-{digest}")


def check_out(out: str | Path | None, overwrite: bool) -> None:
    """Refuse an output directory that holds finished results (before any work is done)."""
    if out is not None and (Path(out) / "results.json").exists() and not overwrite:
        raise CraftVLAError(
            f"{Path(out) / 'results.json'}: already exists; choose another --out, or pass "
            "--overwrite true to replace it"
        )


# Videos are rendered at least this large, whatever the policy's input size (64 px is hard to watch).
MIN_VIDEO_SIZE = 128


def evaluate(
    policy: SimPolicy,
    tasks: str | list[str],
    episodes: int,
    seed: int = 0,
    execute_steps: int = 0,
    out_dir: str | Path | None = None,
    max_steps: int = 200,
    num_videos: int = 2,
    num_envs: int = 5,
    image_size: int = 0,
    camera: str = DEFAULT_CAMERA,
    overwrite: bool = False,
    progress: bool = True,
    about: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Roll `policy` out on each task; returns (and writes to out_dir/results.json) the results dict.

    execute_steps: actions executed from each chunk of H before re-planning (0 = max(1, H // 2)).
    image_size: render size (0 = the policy's, else 64). Deterministic given seed and num_envs.
    about: what was evaluated (e.g. {"policy": "checkpoint", "checkpoint": path}), recorded as "policy".
    """
    tasks = parse_tasks(tasks)
    out = Path(out_dir) if out_dir is not None else None
    check_out(out, overwrite)
    size = image_size or policy.image_size or 64
    spec = RolloutSpec(
        seed=seed,
        stream=EVAL_STREAM,
        max_steps=max_steps,
        num_envs=num_envs,
        execute_steps=execute_steps or max(1, policy.chunk_size // 2),
        image_size=size,
        video_camera=policy.cameras[0] if policy.cameras else parse_cameras(camera)[0],
        video_episodes=num_videos if out is not None else 0,
        video_size=max(size, MIN_VIDEO_SIZE),
    )
    per_task = {task: _run_task(policy, task, episodes, spec, progress) for task in tasks}
    seen_tasks = getattr(policy, "training_tasks", None)
    rows = {task: {**_summary(eps), **_provenance(task, seen_tasks)} for task, eps in per_task.items()}
    settings = {
        "episodes": episodes,
        "seed": seed,
        "max_steps": max_steps,
        "execute_steps": spec.execute_steps,
        "image_size": size,
        "num_envs": num_envs,
    }
    results = {"tasks": rows, **_means(rows), "policy": about or {}, "training_tasks": seen_tasks, "settings": settings}
    if out is not None:
        _write_outputs(out, results, per_task, control_fps(tasks[0]))
    return results


def _provenance(task: str, training_tasks: list[str] | None) -> dict[str, Any]:
    """The task's instruction and whether the policy was trained on it (None: unknown)."""
    text = instruction(task)
    return {"instruction": text, "seen_in_training": None if training_tasks is None else text in training_tasks}


def _means(rows: dict[str, dict]) -> dict[str, Any]:
    """The mean success over every task, and apart over the seen and the unseen ones."""
    out: dict[str, Any] = {"mean_success_rate": float(np.mean([r["success_rate"] for r in rows.values()]))}
    for name, flag in (("seen", True), ("unseen", False)):
        group = [t for t, r in rows.items() if r["seen_in_training"] is flag]
        mean = float(np.mean([rows[t]["success_rate"] for t in group])) if group else None
        out[name] = {"tasks": group, "mean_success_rate": mean}
    return out


def _run_task(policy: SimPolicy, task: str, episodes: int, spec: RolloutSpec, progress: bool) -> list[Episode]:
    done: list[Episode] = []
    with tqdm(total=episodes, desc=task, unit="ep", disable=not progress, file=sys.stderr) as bar:
        for episode in run_episodes(policy, task, episodes, spec):
            done.append(episode)
            bar.update(1)
            bar.set_postfix(success=f"{sum(e.success for e in done)}/{len(done)}")
    return sorted(done, key=lambda e: e.index)


def _summary(episodes: list[Episode]) -> dict[str, Any]:
    return {
        "success_rate": float(np.mean([e.success for e in episodes])),
        "episodes": len(episodes),
        "mean_length": float(np.mean([e.length for e in episodes])),
    }


def _write_outputs(out: Path, results: dict, per_task: dict[str, list[Episode]], fps: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for task, episodes in per_task.items():
        for e in episodes:
            if e.video:
                write_video(
                    out / "videos" / f"{task}_ep{e.index}_{'success' if e.success else 'fail'}.mp4", e.video, fps
                )
    rows = [
        {"task": e.task, "episode": e.index, "seed": e.seed, "success": e.success, "length": e.length}
        for episodes in per_task.values()
        for e in episodes
    ]
    write_json_atomic(out / "episodes.json", rows)
    write_json_atomic(out / "results.json", results)  # last: its presence marks a finished run


def write_video(path: Path, frames: list[np.ndarray], fps: int) -> None:
    """Encode (H, W, 3) uint8 frames as H.264 mp4 (PyAV), atomically (temp file + rename)."""
    import av

    h, w = frames[0].shape[:2]
    with atomic_path(path) as tmp, av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w + w % 2, h + h % 2, "yuv420p"  # even sizes
        for frame in frames:
            frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush


def make_policy(cfg: EvalConfig) -> SimPolicy:
    """The policy named by --policy (a checkpoint is loaded onto --device)."""
    if cfg.policy == "expert":
        return ExpertPolicy()
    if cfg.policy == "random":
        return RandomPolicy(seed=cfg.seed)
    if cfg.policy == "server":
        return ServerPolicy(cfg.server, api_key=cfg.api_key or os.environ.get(API_KEY_ENV) or None)
    policy = CheckpointPolicy.from_pretrained(cfg.checkpoint, device=cfg.device)
    policy.policy.set_inference_precision(cfg.precision)
    if cfg.compile:
        policy.policy.compile_inference()
    return policy


def describe(cfg: EvalConfig) -> dict[str, Any]:
    """What `cfg` evaluates, as recorded in results.json."""
    if cfg.policy == "checkpoint":
        return {"policy": "checkpoint", "checkpoint": str(Path(cfg.checkpoint).resolve())}
    return {"policy": cfg.policy, **({"server": cfg.server} if cfg.policy == "server" else {})}


def main(argv: list[str]) -> int:
    """CLI entry: parse flags, evaluate, print one line per task and the seen / unseen means."""
    cfg = parse_config(EvalConfig, args=argv, prog="craftvla eval")
    check_out(cfg.out, cfg.overwrite)  # before loading anything
    results = evaluate(
        make_policy(cfg),
        cfg.tasks,
        cfg.episodes,
        seed=cfg.seed,
        execute_steps=cfg.execute_steps,
        out_dir=cfg.out,
        max_steps=cfg.max_steps,
        num_videos=cfg.num_videos,
        num_envs=cfg.num_envs,
        image_size=cfg.image_size,
        camera=cfg.camera,
        overwrite=cfg.overwrite,
        about=describe(cfg),
    )
    label = {True: "seen in training", False: "not seen in training", None: "training tasks unknown"}
    for task, row in results["tasks"].items():
        print(
            f"{task}: success {row['success_rate']:.2f} over {row['episodes']} episodes, "
            f"mean length {row['mean_length']:.1f} ({label[row['seen_in_training']]})"
        )
    for name in ("seen", "unseen"):
        if results[name]["tasks"]:
            print(f"mean success rate, {name} tasks: {results[name]['mean_success_rate']:.3f}")
    print(
        f"mean success rate, all tasks: {results['mean_success_rate']:.3f}; results in {Path(cfg.out) / 'results.json'}"
    )
    return 0
