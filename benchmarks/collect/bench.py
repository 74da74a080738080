"""Collection speed (frames/s with rendering), default vs fast render settings, and expert success.

    MUJOCO_GL=egl .venv/bin/python benchmarks/collect/bench.py            # ~3 min on 2 cores

Writes results.md / results.json next to this file. Every speed is measured in this one run,
side by side (same env, same expert, same machine load), so compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np  # noqa: E402

from craftvla.sim.collect import CollectConfig, collect  # noqa: E402
from craftvla.sim.metaworld import COLLECT_STREAM, MetaWorldEnv, ScriptedExpert, episode_seed, make_renderer  # noqa: E402
from craftvla.sim.policies import ExpertPolicy  # noqa: E402
from craftvla.sim.rollout import RolloutSpec, run_episodes  # noqa: E402

HERE = Path(__file__).parent


def render_speed(task: str, size: int, fast: bool, steps: int) -> dict:
    """Frames/s of expert step + render of the corner camera, and of the render call alone."""
    with MetaWorldEnv(task, cameras=()) as env:  # no built-in renderer: we time our own
        renderer = make_renderer(env.env.model, size, fast=fast)
        expert = ScriptedExpert(task)
        try:
            obs = env.reset(episode_seed(0, COLLECT_STREAM, task, 0))
            for _ in range(3):  # warm-up: llvmpipe compiles its shaders on the first frames
                renderer.update_scene(env.env.data, camera="corner")
                renderer.render()
            render_s, t0 = 0.0, time.perf_counter()
            for _ in range(steps):
                obs, _ = env.step(expert.act(obs["raw_obs"]))
                t1 = time.perf_counter()
                renderer.update_scene(env.env.data, camera="corner")
                renderer.render()
                render_s += time.perf_counter() - t1
            total = time.perf_counter() - t0
        finally:
            renderer.close()
    return {
        "size": size,
        "settings": "fast" if fast else "default",
        "steps": steps,
        "frames_per_s": steps / total,
        "render_only_per_s": steps / render_s,
    }


def expert_success(tasks: list[str], episodes: int, max_steps: int) -> dict:
    """Scripted-expert success rate and mean length per task on collection-stream positions."""
    rows = {}
    spec = RolloutSpec(seed=0, stream=COLLECT_STREAM, max_steps=max_steps)
    for task in tasks:
        eps = list(run_episodes(ExpertPolicy(), task, episodes, spec))
        rows[task] = {
            "success": int(sum(e.success for e in eps)),
            "episodes": episodes,
            "mean_length": float(np.mean([e.length for e in eps])),
        }
    return rows


def collect_speed(task: str, episodes: int) -> dict:
    """The whole `collect` (sim + expert + render + video encode + parquet), frames/s."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = collect(CollectConfig(out=f"{tmp}/ds", tasks=task, episodes=episodes))
        seconds = time.perf_counter() - t0
        frames = json.loads(Path(f"{tmp}/ds/meta/info.json").read_text())["total_frames"]
    return {
        "task": task,
        "episodes": summary[task]["kept"],
        "frames": frames,
        "seconds": seconds,
        "frames_per_s": frames / seconds,
    }


def to_markdown(res: dict, command: str) -> str:
    lines = [
        "# Meta-World collection speed and expert success",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {res['machine']}. One process; other jobs may share the 2 cores.",
        "",
        "## Expert step + render of one camera (drawer-close-v3), frames/s",
        "",
        "| size | default settings | fast settings | speed-up | render only: default | fast |",
        "|---|---|---|---|---|---|",
    ]
    for size in res["sizes"]:
        d, f = (next(r for r in res["render"] if r["size"] == size and r["settings"] == s) for s in ("default", "fast"))
        lines.append(
            f"| {size} px | {d['frames_per_s']:.1f} | {f['frames_per_s']:.1f} | "
            f"{f['frames_per_s'] / d['frames_per_s']:.1f}x | {d['render_only_per_s']:.1f} | "
            f"{f['render_only_per_s']:.1f} |"
        )
    c = res["collect"]
    lines += [
        "",
        "Fast = shadows and reflections off, `model.vis.quality.offsamples = 0` (what `collect` uses).",
        "",
        f"Whole `collect` ({c['task']}, {c['episodes']} episodes, 64 px, H.264 + parquet): "
        f"{c['frames']} frames in {c['seconds']:.1f} s = **{c['frames_per_s']:.1f} frames/s** "
        "(includes env construction and encoding).",
        "",
        f"## Scripted-expert success ({res['expert_episodes']} episodes per task, max {res['max_steps']} steps, "
        "collection-stream positions, no rendering)",
        "",
        "| task | solved | mean length (steps) |",
        "|---|---|---|",
    ]
    for task, row in res["experts"].items():
        lines.append(f"| {task} | {row['success']}/{row['episodes']} | {row['mean_length']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--default_steps", type=int, default=40, help="steps timed with default settings (slow)")
    parser.add_argument("--fast_steps", type=int, default=300, help="steps timed with fast settings")
    parser.add_argument("--expert_episodes", type=int, default=20)
    parser.add_argument("--max_steps", type=int, default=200)
    args = parser.parse_args()
    sizes = [64, 128]
    res = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} at start",
        "sizes": sizes,
        "render": [
            render_speed("drawer-close-v3", s, fast, args.fast_steps if fast else args.default_steps)
            for s in sizes
            for fast in (False, True)
        ],
        "collect": collect_speed("drawer-close-v3", 5),
        "expert_episodes": args.expert_episodes,
        "max_steps": args.max_steps,
        "experts": expert_success(
            [
                "drawer-close-v3",
                "button-press-topdown-v3",
                "door-open-v3",
                "window-open-v3",
                "handle-press-v3",
                "plate-slide-v3",
            ],
            args.expert_episodes,
            args.max_steps,
        ),
    }
    (HERE / "results.json").write_text(json.dumps(res, indent=2))
    command = "MUJOCO_GL=egl .venv/bin/python benchmarks/collect/bench.py"
    (HERE / "results.md").write_text(to_markdown(res, command))
    print(to_markdown(res, command))


if __name__ == "__main__":
    main()
