"""Step 1 (craftvla's environment): write datasets with craftvla's LeRobotDatasetWriter and
record what craftvla reads back from them (`ours.json` in each dataset's parent directory).

    .venv/bin/python benchmarks/lerobot_compat/write_ours.py --out runs/lerobot_compat
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from craftvla import cli
from craftvla.data import LeRobotDataset, LeRobotDatasetWriter

CAM = "observation.images.front"
EPISODES = [
    (12, ["close the drawer"] * 12),
    (9, ["press the button"] * 9),
    (14, ["open the door"] * 7 + ["close the drawer"] * 7),
]


def features() -> dict:
    return {
        CAM: {"dtype": "video", "shape": (64, 64, 3), "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": (4,), "names": ["x", "y", "z", "gripper"]},
        "action": {"dtype": "float32", "shape": (4,), "names": ["dx", "dy", "dz", "grip"]},
    }


def image(ep: int, f: int) -> np.ndarray:
    y, x = np.mgrid[0:64, 0:64].astype(np.float32)
    img = np.stack([40 + 50 * ep + 0.5 * x, 30 + 9 * f + 0.5 * y, 200 - 0.75 * (x + y)], axis=-1)
    return np.clip(img, 0, 255).astype(np.uint8)


def write(root: Path, codec: str) -> None:
    rng = np.random.default_rng(0)
    with LeRobotDatasetWriter(root, fps=10, features=features(), robot_type="sawyer", video_codec=codec) as w:
        for ep, (length, tasks) in enumerate(EPISODES):
            for f in range(length):
                w.add_frame(
                    {
                        CAM: image(ep, f),
                        "observation.state": rng.normal(size=4).astype(np.float32),
                        "action": rng.normal(size=4).astype(np.float32),
                    },
                    task=tasks[f],
                )
            w.save_episode()
        w.finalize()


def read_ours(root: Path) -> dict:
    ds = LeRobotDataset(root, chunk_size=1)
    cam = ds.meta.camera_keys[0]
    frames = []
    for i in range(len(ds)):
        item = ds[i]
        frames.append(
            {
                "index": i,
                "task": item["task"],
                "episode_index": item["episode_index"],
                "observation.state": item["observation.state"].tolist(),
                "action": item["action"][0].tolist(),
                "image_mean": item[cam].mean(dim=(1, 2)).tolist(),
            }
        )
    return {"camera": cam, "tasks": ds.meta.tasks, "frames": frames}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/lerobot_compat")
    args = parser.parse_args()
    out = Path(args.out)
    for codec in ("h264", "av1"):
        root = out / f"craftvla_{codec}"
        if not root.exists():
            write(root, codec)
    if not (out / "craftvla_collect").exists():  # a real `craftvla collect` dataset (Meta-World experts)
        cli.main(
            [
                "collect",
                "--out",
                str(out / "craftvla_collect"),
                "--tasks",
                "drawer-close-v3,door-open-v3",
                "--episodes",
                "2",
            ]
        )
    for name in ("craftvla_h264", "craftvla_av1", "craftvla_collect"):
        (out / f"{name}.ours.json").write_text(json.dumps(read_ours(out / name)))
        print(f"read {out / name}")


if __name__ == "__main__":
    main()
