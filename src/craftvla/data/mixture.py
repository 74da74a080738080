"""Several LeRobot datasets as one training stream, mixed by weight (replay, co-training).

    craftvla train --dataset.roots new_task,old_tasks --dataset.weights 0.98,0.02 ...

`MixedDataset` concatenates the sources (global index = the source's offset + its own index) and
tags every item with its source (`SOURCE_KEY`). Which source fills stream position p is a pure
function of p: the Weyl sequence u_p = frac(p * phi + 1/2) (phi = the golden ratio's conjugate)
falls into source k's slice of [0, 1) with the width of its weight. Its discrepancy is O(log n / n),
so every window of the stream holds each source in its proportion (a 2 % source appears once every
~50 samples, never in clumps); an i.i.d. draw would leave batches with 0 or 3 replay samples.
Within a source, samples run through seeded per-epoch permutations of that source alone, so a
small source is cycled (epochs of its own) while a large one is still in its first pass.

Every position depends only on (seed, weights, position), so a resumed run continues the exact
stream, and ranks split a step's positions as `StepSampler` does.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from craftvla.errors import ConfigError, CraftVLAError
from craftvla.keys import SOURCE_KEY

PHI = (math.sqrt(5.0) - 1.0) / 2.0  # golden ratio conjugate: the Weyl sequence's step
_CHUNK = 1 << 20  # positions counted per numpy call (bounded memory for very long runs)


class EpochPermutation:
    """Position -> sample index of an endless stream of seeded permutations of range(n)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._cache: tuple[int, torch.Tensor] | None = None

    def __call__(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if self._cache is None or self._cache[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = (epoch, torch.randperm(self.n, generator=gen))
        return int(self._cache[1][offset])


def mixture_bounds(weights: Sequence[float]) -> np.ndarray:
    """(K+1,) cumulative slice boundaries of [0, 1] for the normalised weights."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or (w < 0).any() or not w.sum() > 0:
        raise ConfigError(f"mixing weights {list(weights)}: need one non-negative weight per source, not all zero")
    return np.concatenate([[0.0], np.cumsum(w / w.sum())])


def source_of(positions: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """The source (K,) index filling each stream position: (N,) int -> (N,) int."""
    u = np.mod(positions.astype(np.float64) * PHI + 0.5, 1.0)
    return np.searchsorted(bounds, u, side="right") - 1


def source_counts(end: int, bounds: np.ndarray, start: int = 0) -> np.ndarray:
    """(K,) how many of the stream positions [start, end) each source fills."""
    counts = np.zeros(len(bounds) - 1, dtype=np.int64)
    for first in range(start, end, _CHUNK):
        src = source_of(np.arange(first, min(end, first + _CHUNK)), bounds)
        counts += np.bincount(src, minlength=len(counts))
    return counts


class MixtureIndex:
    """Stream position -> global index into a `MixedDataset`, visited in increasing order.

    Keeps a per-source position counter: a forward jump (another rank's slice, a resumed start)
    counts only the positions skipped, in one vectorised pass; going back recounts from 0.
    """

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int) -> None:
        self.bounds = mixture_bounds(weights)
        if len(sizes) != len(self.bounds) - 1:
            raise ConfigError(f"{len(sizes)} datasets but {len(self.bounds) - 1} mixing weights")
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.perms = [EpochPermutation(int(n), seed * 7919 + k) for k, n in enumerate(sizes)]
        self._next = 0  # the position the counters below stand at
        self._counts = np.zeros(len(sizes), dtype=np.int64)  # (K,) samples drawn per source before it

    def __call__(self, position: int) -> int:
        if position < self._next:
            self._next, self._counts = 0, np.zeros_like(self._counts)
        if position > self._next:
            self._counts += source_counts(position, self.bounds, start=self._next)
        k = int(source_of(np.array([position]), self.bounds)[0])
        local = self.perms[k](int(self._counts[k]))
        self._counts[k] += 1
        self._next = position + 1
        return int(self.offsets[k]) + local


class MixedDataset(Dataset):
    """LeRobot datasets concatenated; items carry SOURCE_KEY (their source's position in `datasets`).

    The sources must agree on cameras, state and action sizes and frame rate; `stats` combines
    theirs by frame counts (LeRobot's aggregate_stats) and `meta` is the first source's.
    """

    def __init__(self, datasets: Sequence[Any], names: Sequence[str]) -> None:
        if not datasets:
            raise ConfigError("a dataset mixture needs at least one dataset")
        self.datasets, self.names = list(datasets), list(names)
        first = datasets[0]
        for ds in datasets[1:]:
            for attr in ("camera_keys", "state_dim", "action_dim", "fps"):
                a, b = getattr(first.meta, attr), getattr(ds.meta, attr)
                if a != b:
                    raise CraftVLAError(f"datasets {first.root} and {ds.root} cannot be mixed: {attr} {a!r} vs {b!r}")
        self.meta = first.meta
        self.sizes = [len(ds) for ds in datasets]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.stats = _aggregate_stats([ds.stats for ds in datasets])

    @property
    def transform(self):
        return self.datasets[0].transform

    @transform.setter
    def transform(self, fn) -> None:
        for ds in self.datasets:
            ds.transform = fn

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> dict[str, Any]:
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        if not 0 <= k < len(self.datasets):
            raise IndexError(f"index {i} out of range for a mixture of {len(self)} frames")
        item = self.datasets[k][int(i - self.offsets[k])]
        item[SOURCE_KEY] = k
        return item


def _aggregate_stats(stats_list: list[dict]) -> dict:
    """Per feature, the sources' statistics combined by frame counts (features all sources have)."""
    from craftvla.data.stats import aggregate

    keys = set.intersection(*(set(s) for s in stats_list)) if stats_list else set()
    return {key: aggregate([s[key] for s in stats_list]) if len(stats_list) > 1 else stats_list[0][key] for key in keys}


class MixtureCounter:
    """Samples drawn so far per source, for the training log: `update(step)` after each optimizer
    step -> {"data/samples/<name>": count}. Exact after a resume (counted from the stream)."""

    def __init__(self, names: Sequence[str], weights: Sequence[float], batch_size: int, start_step: int = 0):
        self.names, self.bounds, self.batch_size = list(names), mixture_bounds(weights), batch_size
        self.step = start_step
        self.counts = source_counts(start_step * batch_size, self.bounds)

    def update(self, step: int) -> dict[str, int]:
        if step > self.step:
            self.counts += source_counts(step * self.batch_size, self.bounds, start=self.step * self.batch_size)
            self.step = step
        return {f"data/samples/{name}": int(c) for name, c in zip(self.names, self.counts)}


def source_names(paths: Sequence[str]) -> list[str]:
    """Short unique names for dataset directories: their basenames, numbered when they repeat."""
    from pathlib import Path

    base = [Path(p).resolve().name or "dataset" for p in paths]
    return [f"{b}_{i}" if base.count(b) > 1 else b for i, b in enumerate(base)]
