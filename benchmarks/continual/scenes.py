"""Are the continual study's conflict tasks fair tests? For each generalist task and the Meta-World task
that shares its scene with the opposite behaviour (and window-open, the separate-scene stage):

- the scripted expert's success over `EPISODES` fresh positions (collection seed stream),
- whether the goal is visible at the policy's 64 px: the pixels (of 64 x 64) whose colour changes by
  more than `THRESHOLD` / 255 in some channel between the first frame and the solved frame,
- how alike the paired tasks' scenes look at the start: the share of pixels that differ between the
  two first frames drawn from the same episode seeds (0 = the image alone cannot tell the instructions apart).

    .venv/bin/python benchmarks/continual/scenes.py      # scenes.json + scenes.png (about 3 minutes)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from _lib import write_json  # noqa: E402

os.environ.setdefault("MUJOCO_GL", "egl")
PAIRS = [  # (generalist task, the new task in its scene); window-open has a scene of its own
    ("drawer-close-v3", "drawer-open-v3"),
    ("door-open-v3", "door-close-v3"),
    ("handle-press-v3", "handle-pull-v3"),
    ("plate-slide-v3", "plate-slide-back-v3"),
    (None, "window-open-v3"),
]
EPISODES = 20
THRESHOLD = 40
SIZE = 64


def expert_episode(task: str, index: int, seed_task: str, max_steps: int = 200) -> tuple[np.ndarray, np.ndarray, bool]:
    """(first frame, last frame, solved) of the scripted expert on episode `index` of `seed_task`'s
    collection stream (a pair shares its seeds, so its two scenes are drawn from the same numbers)."""
    from craftvla.keys import IMAGE_PREFIX, RAW_OBS_KEY
    from craftvla.sim.metaworld import COLLECT_STREAM, DEFAULT_CAMERA, MetaWorldEnv, ScriptedExpert, episode_seed

    key = IMAGE_PREFIX + DEFAULT_CAMERA
    expert = ScriptedExpert(task)
    with MetaWorldEnv(task, image_size=SIZE) as env:
        obs = env.reset(episode_seed(0, COLLECT_STREAM, seed_task, index))
        first, solved = obs[key], False
        for _ in range(max_steps):
            obs, solved = env.step(expert.act(obs[RAW_OBS_KEY]))
            if solved:
                break
        return first, obs[key], solved


def changed(a: np.ndarray, b: np.ndarray) -> float:
    """Share of pixels whose colour differs by more than THRESHOLD in some channel."""
    return float((np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=-1) > THRESHOLD).mean())


def measure(task: str, seed_task: str) -> tuple[dict, list[np.ndarray]]:
    frames, solved, change = [], 0, []
    for i in range(EPISODES):
        first, last, ok = expert_episode(task, i, seed_task)
        solved += ok
        change.append(changed(first, last))
        frames.append((first, last))
    record = {"expert_solved": solved, "episodes": EPISODES, "goal_pixels_changed": float(np.mean(change))}
    return record, frames


def main() -> int:
    out: dict[str, dict] = {}
    images: dict[str, list] = {}
    for old, new in PAIRS:
        for task in filter(None, (old, new)):
            if task not in out:
                out[task], images[task] = measure(task, old or new)
        if old is not None:
            alike = [changed(images[old][i][0], images[new][i][0]) for i in range(EPISODES)]
            out[new]["first_frame_differs_from"] = {"task": old, "pixels": float(np.mean(alike))}
    write_json(HERE / "scenes.json", {"threshold": THRESHOLD, "image_size": SIZE, "tasks": out})
    plot(images, HERE / "scenes.png")
    for task, r in out.items():
        pair = r.get("first_frame_differs_from")
        tail = f"; first frame vs {pair['task']}: {pair['pixels']:.1%} of pixels differ" if pair else ""
        print(f"{task}: expert {r['expert_solved']}/{r['episodes']}, goal changes {r['goal_pixels_changed']:.1%}{tail}")
    return 0


def plot(images: dict[str, list], path: Path) -> None:
    """Episode 0 of every task: its first and its solved frame, at the policy's 64 px (nearest x2)."""
    from craftvla.train.plots import pyplot, save_figure

    plt = pyplot()
    tasks = list(images)
    fig, axes = plt.subplots(2, len(tasks), figsize=(1.6 * len(tasks), 3.5), dpi=110)
    for j, task in enumerate(tasks):
        for i in range(2):
            axes[i, j].imshow(images[task][0][i], interpolation="nearest")
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
        axes[0, j].set_title(task.removesuffix("-v3"), fontsize=7)
    axes[0, 0].set_ylabel("start", fontsize=8)
    axes[1, 0].set_ylabel("solved", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
