"""Fine-tuning keeps the processor it starts from unless told otherwise (--init_stats)."""

from __future__ import annotations

import numpy as np
import pytest

from craftvla.model.policy import VLAPolicy
from craftvla.train.loop import train
from tests.train.conftest import train_config, write_tiny_dataset

FLAGS = ["--steps", "1", "--batch_size", "2", "--checkpoint.save_freq", "1"]


@pytest.fixture(scope="module")
def generalist(tmp_path_factory, tiny_dataset):
    out = tmp_path_factory.mktemp("gen") / "run"
    train(train_config(out, "--dataset.root", str(tiny_dataset), *FLAGS))
    return out / "checkpoints/last"


@pytest.fixture(scope="module")
def new_task(tmp_path_factory):
    return write_tiny_dataset(tmp_path_factory.mktemp("new") / "data", episodes=2, length=7)


def _finetuned_stats(tmp_path, generalist, new_task, *flags):
    out = tmp_path / "ft"
    train(train_config(out, "--dataset.root", str(new_task), "--init_from", str(generalist), *FLAGS, *flags))
    return VLAPolicy.from_pretrained(out / "checkpoints/last").processor


def test_keep_is_the_default(tmp_path, generalist, new_task):
    old = VLAPolicy.from_pretrained(generalist).processor
    processor = _finetuned_stats(tmp_path, generalist, new_task)
    for key in ("observation.state", "action"):
        for stat in ("mean", "std", "min", "max"):
            np.testing.assert_array_equal(processor.stats[key][stat], old.stats[key][stat])
    assert processor.stats_source.startswith("kept from --init_from") and "dataset" in processor.stats_source


def test_dataset_recomputes(tmp_path, generalist, new_task):
    from craftvla.data import LeRobotDataset

    processor = _finetuned_stats(tmp_path, generalist, new_task, "--init_stats", "dataset")
    new = LeRobotDataset(new_task, chunk_size=4).stats
    np.testing.assert_allclose(processor.stats["action"]["mean"], new["action"]["mean"], rtol=1e-6)
    assert processor.stats_source == f"dataset {new_task}"


def test_aggregate_weights_by_frame_count(tmp_path, generalist, new_task):
    old = VLAPolicy.from_pretrained(generalist).processor.stats["action"]
    from craftvla.data import LeRobotDataset

    new = LeRobotDataset(new_task, chunk_size=4).stats["action"]
    processor = _finetuned_stats(tmp_path, generalist, new_task, "--init_stats", "aggregate")
    n_old, n_new = int(old["count"][0]), int(new["count"][0])
    assert (n_old, n_new) == (36, 14)  # 3 x 12 and 2 x 7 frames
    mean = (n_old * old["mean"] + n_new * new["mean"]) / (n_old + n_new)
    var = (
        n_old * (old["std"] ** 2 + (old["mean"] - mean) ** 2) + n_new * (new["std"] ** 2 + (new["mean"] - mean) ** 2)
    ) / 50
    got = processor.stats["action"]
    np.testing.assert_allclose(got["mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(got["std"], np.sqrt(var), rtol=1e-5)
    np.testing.assert_array_equal(got["min"], np.minimum(old["min"], new["min"]))
    assert processor.stats_source.startswith("aggregate of --init_from")
