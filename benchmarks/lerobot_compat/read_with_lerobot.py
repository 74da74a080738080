"""Step 2 (a throw-away environment with lerobot==0.4.4): open craftvla-written datasets with
the real `lerobot.datasets.lerobot_dataset.LeRobotDataset`, iterate every frame (and a
DataLoader pass with delta_timestamps action chunks), and compare with what craftvla read.

    /tmp/lr/bin/python benchmarks/lerobot_compat/read_with_lerobot.py --out runs/lerobot_compat \
        --results benchmarks/lerobot_compat/results.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lerobot
import numpy as np
import torch
from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata


def compare(root: Path, ours: dict) -> dict:
    meta = LeRobotDatasetMetadata("craftvla/compat", root=root)
    ds = LeRobotDataset("craftvla/compat", root=root)
    cam = ours["camera"]
    worst = {"state": 0.0, "action": 0.0, "image_mean": 0.0}
    task_mismatch = 0
    for f in ours["frames"]:
        item = ds[f["index"]]
        task_mismatch += item["task"] != f["task"]
        worst["state"] = max(
            worst["state"], float(np.abs(item["observation.state"].numpy() - f["observation.state"]).max())
        )
        worst["action"] = max(worst["action"], float(np.abs(item["action"].numpy() - f["action"]).max()))
        mean = item[cam].mean(dim=(1, 2)).numpy()
        worst["image_mean"] = max(worst["image_mean"], float(np.abs(mean - f["image_mean"]).max()))
    # A training-style pass: action chunks of 4 through delta_timestamps, batched by a DataLoader.
    steps = [k / meta.fps for k in range(4)]
    chunked = LeRobotDataset("craftvla/compat", root=root, delta_timestamps={"action": steps})
    batches = list(torch.utils.data.DataLoader(chunked, batch_size=8))
    return {
        "lerobot_tasks": meta.tasks.index.tolist(),
        "ours_tasks": ours["tasks"],
        "frames": len(ds),
        "episodes": ds.num_episodes,
        "camera": cam,
        "fps": meta.fps,
        "codec": meta.features[cam]["info"]["video.codec"],
        "task_mismatches": int(task_mismatch),
        "max_abs_diff": worst,
        "dataloader_batches": len(batches),
        "action_chunk_shape": list(batches[0]["action"].shape),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/lerobot_compat")
    parser.add_argument("--results", default="benchmarks/lerobot_compat/results.json")
    args = parser.parse_args()
    results = {"lerobot_version": lerobot.__version__, "torch": torch.__version__, "datasets": {}}
    for ours_path in sorted(Path(args.out).glob("*.ours.json")):
        name = ours_path.name.removesuffix(".ours.json")
        results["datasets"][name] = row = compare(Path(args.out) / name, json.loads(ours_path.read_text()))
        print(name, json.dumps(row))
    Path(args.results).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
