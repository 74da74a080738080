"""Data-loader throughput on a LeRobot v3 dataset: frames/s through a torch DataLoader.

    MUJOCO_GL=egl .venv/bin/python benchmarks/data_loader/bench.py --root runs/bench_train_metaworld/data \
        [--batches 40] [--out benchmarks/data_loader]

(The dataset is what `benchmarks/train_metaworld/run.sh` collects: 3 Meta-World tasks x 50
episodes, 64 px corner camera, H.264; or any LeRobot v3 directory.)

Variants, each over the same shuffled sample order (batch 32, as training reads it):
- `episode cache` (the default `LeRobotDataset`): each worker decodes an episode slice once and
  keeps it in an LRU (512 MiB), so the first epoch decodes every episode once and later reads are
  memory copies. Measured cold (first pass, fresh workers) and warm (second pass, same workers).
- `per-sample slice` (`video_cache_mb=0`): every sample seeks to its episode's keyframe and
  decodes that slice anew.
- `whole-file decode` (the naive reader the issue rules out): every sample decodes its mp4 from
  the first frame up to the wanted one. Measured on a few batches only; it is that slow.
Workers 0 and 2 for each; the two cores are shared by the workers and the main process.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import av
import torch
from torch.utils.data import DataLoader

from craftvla.data import LeRobotDataset


class WholeFileDecode(LeRobotDataset):
    """`LeRobotDataset` whose images come from decoding the file from its start (the naive way)."""

    def _image(self, key: str, ep: int, ts: float) -> torch.Tensor:
        path = self._video_files[key][ep]
        target = float(self._episodes[f"videos/{key}/from_timestamp"][ep]) + ts
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                if frame.time >= target - 0.4 / self.meta.fps:
                    rgb = frame.to_ndarray(format="rgb24")
                    break
        return torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)


def frames_per_s(loader: DataLoader, batches: int) -> float:
    """Samples/s over `batches` batches of an already-created iterator."""
    start, seen = time.perf_counter(), 0
    for _, batch in zip(range(batches), loader):
        seen += len(batch["index"])
    return seen / (time.perf_counter() - start)


def measure(dataset, workers: int, batches: int, passes: int, seed: int = 0) -> list[float]:
    """Frames/s of `passes` consecutive passes over the first `batches` batches of one shuffled order
    (persistent workers: pass 2 sees the caches pass 1 filled)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[: batches * 32].tolist()
    loader = DataLoader(dataset, batch_size=32, sampler=order, num_workers=workers, persistent_workers=workers > 0)
    return [frames_per_s(loader, batches) for _ in range(passes)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True, help="a LeRobot v3 dataset directory")
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--naive_batches", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not (Path(args.root) / "meta" / "info.json").is_file():
        raise SystemExit(f"{args.root}: not a LeRobot dataset; collect one with benchmarks/train_metaworld/run.sh")
    rows = []
    for workers in (0, 2):
        cold, warm = measure(LeRobotDataset(args.root), workers, args.batches, passes=2)
        rows.append({"variant": "episode cache (default)", "workers": workers, "cold": cold, "warm": warm})
        (fps,) = measure(LeRobotDataset(args.root, video_cache_mb=0), workers, args.batches, passes=1)
        rows.append({"variant": "per-sample slice (cache off)", "workers": workers, "cold": fps, "warm": None})
        (fps,) = measure(WholeFileDecode(args.root, video_cache_mb=0), workers, args.naive_batches, passes=1)
        rows.append({"variant": "whole-file decode (naive)", "workers": workers, "cold": fps, "warm": None})
    meta = LeRobotDataset(args.root).meta
    header = (
        f"dataset: {args.root} ({meta.total_episodes} episodes, {meta.total_frames} frames, cameras "
        f"{meta.camera_keys}); batch 32, shuffled; {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} at the end; torch {torch.__version__}"
    )
    lines = [
        header,
        "",
        "| reader | workers | frames/s, first pass (cold) | frames/s, second pass (warm) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        warm = "-" if r["warm"] is None else f"{r['warm']:.0f}"
        lines.append(f"| {r['variant']} | {r['workers']} | {r['cold']:.0f} | {warm} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out, "results.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2))
        Path(args.out, "results.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
