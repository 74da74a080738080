"""CRaFT's anchor data: the samples the retention targets are computed on (typically the old
tasks' frames, `--craft.anchor_dataset`), as a dataset the policy's processor converts, as an
endless step-positioned stream of micro-batches, and as the calibration batches the loss scale is
measured on. (An anchor cache, craft/cache.py, stores its own anchor samples.)
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from craftvla.data.loading import StepSampler, collate, data_loader
from craftvla.errors import CraftVLAError

BatchStream = Callable[[int], Iterator[dict]]  # optimizer step -> anchor micro-batches from that step on


def open_anchor_dataset(roots: str, policy: nn.Module):
    """The anchor data converted by the policy's processor (its statistics, else the data's): one
    LeRobot dataset, or several (`roots` comma-separated: e.g. the start policy's tasks and the tasks
    of earlier continual stages) concatenated as a `MixedDataset`, whose items carry their source."""
    from craftvla.data import LeRobotDataset
    from craftvla.data.mixture import MixedDataset, source_names

    paths = [r.strip() for r in roots.split(",") if r.strip()]
    datasets = []
    for root in paths:
        dataset = LeRobotDataset(root, chunk_size=policy.config.chunk_size)
        missing = [k for k in policy.config.camera_keys if k not in dataset.meta.camera_keys]
        if missing:
            raise CraftVLAError(f"dataset {root}: cameras {dataset.meta.camera_keys} lack the policy's {missing}")
        datasets.append(dataset)
    data = datasets[0] if len(datasets) == 1 else MixedDataset(datasets, source_names(paths))
    if policy.processor.stats is None:
        policy.set_stats(data.stats, f"anchor dataset {roots}")
    data.transform = policy.processor.transform
    return data


def fixed_frames(dataset, count: int, seed: int):
    """A seeded random subset of `count` frames of `dataset` (`--craft.anchor_frames`; all of them
    when it has no more): the fixed anchor set the stream and the calibration then draw from.
    Items keep their dataset `index`."""
    if count >= len(dataset):
        return dataset
    picked = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count]
    return Subset(dataset, sorted(picked.tolist()))


def anchor_batch_stream(
    dataset, batch_size: int, micro_per_step: int, seed: int, rank: int = 0, world_size: int = 1, num_workers: int = 0
) -> BatchStream:
    """step -> endless anchor micro-batches of `batch_size` from that optimizer step on; each step
    takes `micro_per_step` of them per rank, ranks take disjoint samples (as the task data does),
    and the position is a function of the step, so a resumed run draws what it would have drawn."""

    def stream(step: int) -> Iterator[dict]:
        sampler = StepSampler(
            len(dataset), seed, batch_size * world_size * micro_per_step, batch_size, rank, world_size, step
        )
        return iter(data_loader(dataset, sampler, num_workers, seed + rank))

    return stream


def calibration_batches(dataset, num_samples: int, seed: int, fake_config=None, batch_size: int = 32) -> Iterator[dict]:
    """`num_samples` anchor samples (a seeded random subset of `dataset`, or fake batches of
    `fake_config` without one) in micro-batches, for measuring the retention targets' spread."""
    if dataset is None:
        for first in range(0, num_samples, batch_size):
            yield fake_config.fake_batch(min(batch_size, num_samples - first), seed=seed * 1_000_003 + first)
        return
    gen = torch.Generator().manual_seed(seed)
    picked = torch.randperm(len(dataset), generator=gen)[:num_samples].tolist()
    yield from DataLoader(Subset(dataset, picked), batch_size=batch_size, collate_fn=collate)
