"""The resumable, rank-sharded sample order."""

from __future__ import annotations

import itertools

from craftvla.data.loading import StepSampler


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_ranks_and_micro_batches_partition_each_global_batch():
    n, batch = 10, 8
    single = _take(StepSampler(n, seed=1, batch_size=batch, micro_batch_size=8), 24)  # 3 steps
    per_rank = [_take(StepSampler(n, 1, batch, micro_batch_size=2, rank=r, world_size=2), 12) for r in range(2)]
    for step in range(3):
        mine = [per_rank[r][4 * step : 4 * step + 4] for r in range(2)]
        assert sorted(mine[0] + mine[1]) == sorted(single[8 * step : 8 * step + 8])
    first_epoch = single[:10]
    assert sorted(first_epoch) == list(range(10))  # every frame once per epoch
    assert single[10:20] != first_epoch  # the next epoch is reshuffled


def test_start_step_continues_the_same_stream():
    full = _take(StepSampler(7, seed=0, batch_size=4, micro_batch_size=2), 20)
    resumed = _take(StepSampler(7, seed=0, batch_size=4, micro_batch_size=2, start_step=3), 8)
    assert resumed == full[12:20]
