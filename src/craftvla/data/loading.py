"""Micro-batches for training (the loop) and anchor data (CRaFT): a resumable, rank-sharded sample
order, and fake batches.

The sample order is one global stream: epoch e is `randperm(N)` seeded by (seed, e), epochs are
concatenated, and optimizer step s consumes stream positions [s*B, (s+1)*B) for B = batch_size.
Within a step, micro-batch m of rank r takes the slice starting at (m*world + r)*b (b = the
micro-batch size). The position is therefore a function of the step alone: resuming at step k
rebuilds exactly the order the uninterrupted run would have used, and 2 ranks x 4 samples cover
the same 8 samples as 1 rank x 8 (what the DDP and accumulation tests compare).
"""

from __future__ import annotations

import random
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from craftvla.config import VLAConfig
from craftvla.data.mixture import EpochPermutation
from craftvla.model.processor import crop_text_padding


class StepSampler(Sampler[int]):
    """Infinite index stream for one rank, starting at optimizer step `start_step` (see module doc).

    `index` maps a stream position to a dataset index: by default seeded per-epoch permutations
    of range(num_samples); a dataset mixture passes its `MixtureIndex` (data/mixture.py)."""

    def __init__(
        self,
        num_samples: int,
        seed: int,
        batch_size: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        index: Optional[Callable[[int], int]] = None,
    ) -> None:
        self.n, self.seed, self.start_step = num_samples, seed, start_step
        self.batch_size, self.micro, self.rank, self.world = batch_size, micro_batch_size, rank, world_size
        self._index = index or EpochPermutation(num_samples, seed)

    def positions(self, step: int) -> list[int]:
        """Stream positions this rank reads at optimizer step `step`, in micro-batch order."""
        out = []
        for m in range(self.batch_size // (self.micro * self.world)):
            first = step * self.batch_size + (m * self.world + self.rank) * self.micro
            out.extend(range(first, first + self.micro))
        return out

    def __iter__(self) -> Iterator[int]:
        step = self.start_step
        while True:
            for position in self.positions(step):
                yield self._index(position)
            step += 1

    def __len__(self) -> int:  # DataLoader only needs it for len(loader); the stream is endless
        return 2**62


def _seed_worker(worker_id: int) -> None:
    """Seed numpy/python in each DataLoader worker from torch's per-worker seed (PyTorch recipe)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def data_loader(dataset, sampler: StepSampler, num_workers: int, seed: int) -> DataLoader:
    """A DataLoader yielding micro-batches in the sampler's order; strings collate to lists.

    The explicit generator keeps the loader from drawing its worker base seed from the global
    torch RNG, so creating the iterator does not perturb the training RNG stream.
    """
    return DataLoader(
        dataset,
        batch_size=sampler.micro,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def collate(items: list[dict]) -> dict:
    """torch's default collation, then instruction tokens trimmed to the batch's longest."""
    from torch.utils.data import default_collate

    return crop_text_padding(default_collate(items))


def select_rows(batch: dict, rows: list[int]) -> dict:
    """The samples `rows` of a collated CPU batch: tensors and lists taken along their first axis
    (anything else kept as is), instruction tokens re-trimmed to the selection's longest."""
    index = torch.tensor(rows, dtype=torch.long)
    picked = {
        k: v.index_select(0, index)
        if torch.is_tensor(v) and v.dim()
        else [v[r] for r in rows]
        if isinstance(v, list)
        else v
        for k, v in batch.items()
    }
    return crop_text_padding(picked)


def fake_micro_batches(
    cfg: VLAConfig,
    seed: int,
    micro_batch_size: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
) -> Iterator[dict]:
    """Endless `cfg.fake_batch` micro-batches, each seeded by its stream position (resumable)."""
    sampler = StepSampler(1, seed, batch_size, micro_batch_size, rank, world_size, start_step)
    step = start_step
    while True:
        positions = sampler.positions(step)
        for first in positions[::micro_batch_size]:
            yield cfg.fake_batch(micro_batch_size, seed=seed * 1_000_003 + first)
        step += 1


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors moved to `device` (non-blocking from pinned memory); strings and lists untouched."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
