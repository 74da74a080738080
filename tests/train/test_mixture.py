"""Dataset mixtures (--dataset.roots / --dataset.weights): proportions, resumable order, training."""

from __future__ import annotations

import json

import numpy as np
import pytest

from craftvla.data.loading import StepSampler
from craftvla.data.mixture import MixedDataset, MixtureIndex, mixture_bounds, source_counts, source_of
from craftvla.errors import ConfigError, CraftVLAError
from craftvla.keys import SOURCE_KEY

from .conftest import train_config, write_tiny_dataset


def test_sources_fill_the_stream_in_proportion_in_every_window():
    bounds = mixture_bounds([0.98, 0.02])
    src = source_of(np.arange(100_000), bounds)
    assert abs((src == 1).sum() - 2_000) <= 2  # low discrepancy: off by at most a couple
    gaps = np.diff(np.flatnonzero(src == 1))  # three-distance theorem: only a few distinct gaps
    assert set(gaps.tolist()) <= {21, 34, 55, 89} and gaps.min() >= 21  # never two replays close together
    for first in range(0, 100_000, 500):  # every 500-sample window holds 10 +- 1 replay samples
        assert abs((src[first : first + 500] == 1).sum() - 10) <= 1
    counts = source_counts(12_345, mixture_bounds([1, 2, 1]))
    assert counts.sum() == 12_345
    np.testing.assert_allclose(counts / 12_345, [0.25, 0.5, 0.25], atol=3e-4)


def test_each_source_is_cycled_through_its_own_permutations():
    index = MixtureIndex([5, 1000], [0.5, 0.5], seed=3)
    drawn = np.array([index(p) for p in range(40)])
    small = drawn[drawn < 5]
    assert len(small) == source_counts(40, mixture_bounds([0.5, 0.5]))[0] and abs(len(small) - 20) <= 1
    for epoch in range(3):  # full passes over the 5-frame source, each a permutation
        assert sorted(small[5 * epoch : 5 * epoch + 5].tolist()) == [0, 1, 2, 3, 4]
    big = drawn[drawn >= 5] - 5
    assert len(set(big.tolist())) == len(big) >= 19  # no repeats within the large source's first epoch


def test_index_is_a_function_of_the_position():
    sequential = MixtureIndex([30, 70], [0.9, 0.1], seed=1)
    order = [sequential(p) for p in range(600)]
    jumped = MixtureIndex([30, 70], [0.9, 0.1], seed=1)
    assert [jumped(p) for p in range(400, 600)] == order[400:]  # a resumed run continues exactly
    assert [jumped(p) for p in range(100, 150)] == order[100:150]  # and going back recounts
    # two ranks splitting each step's positions see exactly the samples one rank sees
    one = StepSampler(100, 0, 8, 8, index=MixtureIndex([30, 70], [0.9, 0.1], seed=1))
    ranks = [
        StepSampler(100, 0, 8, 4, rank=r, world_size=2, index=MixtureIndex([30, 70], [0.9, 0.1], seed=1))
        for r in range(2)
    ]
    it1, its = iter(one), [iter(s) for s in ranks]
    for _ in range(20):  # step by step: rank 0 takes the first 4 of the 8, rank 1 the rest
        assert [next(it1) for _ in range(8)] == [next(its[0]) for _ in range(4)] + [next(its[1]) for _ in range(4)]


def test_bad_weights_are_clear_errors():
    with pytest.raises(ConfigError, match="not all zero"):
        mixture_bounds([0.0, 0.0])
    with pytest.raises(ConfigError, match="2 datasets but 3"):
        MixtureIndex([4, 4], [1, 1, 1], seed=0)
    with pytest.raises(ConfigError, match="one weight per dataset"):
        train_config("/tmp/x", "--dataset.roots", "a,b", "--dataset.weights", "1")
    with pytest.raises(ConfigError, match="comma-separated floats"):
        train_config("/tmp/x", "--dataset.roots", "a,b", "--dataset.weights", "1,x")
    with pytest.raises(ConfigError, match="conflicts with dataset.root"):
        train_config("/tmp/x", "--dataset.root", "a", "--dataset.roots", "a,b")


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return write_tiny_dataset(root / "old", episodes=2, length=10), write_tiny_dataset(root / "new", episodes=3)


def test_mixed_dataset_tags_sources_and_pools_statistics(two_datasets):
    from craftvla.data import LeRobotDataset

    a, b = (LeRobotDataset(p, chunk_size=4) for p in two_datasets)
    mixed = MixedDataset([a, b], ["old", "new"])
    assert len(mixed) == len(a) + len(b) == 20 + 36
    item = mixed[len(a) + 5]
    assert item[SOURCE_KEY] == 1 and item["index"] == 5
    assert mixed[3][SOURCE_KEY] == 0
    actions = np.concatenate([a._columns["action"], b._columns["action"]])  # pooled by frame counts
    np.testing.assert_allclose(mixed.stats["action"]["mean"], actions.mean(0), atol=1e-5)
    np.testing.assert_allclose(mixed.stats["action"]["std"], actions.std(0), atol=1e-5)


def test_mixing_datasets_of_different_rates_is_refused(two_datasets, tmp_path):
    from craftvla.data import LeRobotDataset

    other = LeRobotDataset(write_tiny_dataset(tmp_path / "fast", episodes=1, fps=20), chunk_size=4)
    with pytest.raises(CraftVLAError, match="cannot be mixed: fps 10 vs 20"):
        MixedDataset([LeRobotDataset(two_datasets[0]), other], ["a", "b"])


def test_training_on_a_mixture_logs_per_source_counts(two_datasets, tmp_path):
    from craftvla.train.loop import setup

    old, new = two_datasets
    cfg = train_config(
        tmp_path / "run",
        "--dataset.roots",
        f"{new},{old}",
        "--dataset.weights",
        "0.75,0.25",
        "--steps",
        "6",
        "--batch_size",
        "8",
        "--log.log_freq",
        "3",
    )
    run = setup(cfg)
    seen = np.concatenate([next(run.batches)[SOURCE_KEY].numpy() for _ in range(6)])  # 6 steps x 8
    np.testing.assert_array_equal(np.bincount(seen, minlength=2), source_counts(48, mixture_bounds([0.75, 0.25])))
    assert abs((seen == 1).sum() - 12) <= 1  # 25 percent of 48, off by at most one

    from craftvla.train.loop import train

    train(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    expected = source_counts(48, mixture_bounds([0.75, 0.25]))
    assert (lines[-1]["data/samples/new"], lines[-1]["data/samples/old"]) == tuple(expected.tolist())
    assert lines[0]["data/samples/new"] + lines[0]["data/samples/old"] == 24  # after 3 steps of 8


def test_source_names_are_short_and_unique(tmp_path):
    from craftvla.data.mixture import source_names

    assert source_names([str(tmp_path / "a" / "data"), str(tmp_path / "b" / "data"), str(tmp_path / "old")]) == [
        "data_0",
        "data_1",
        "old",
    ]
