"""Normalize / Unnormalize against hand-computed values; image transforms keep shapes; purity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from craftvla.data import ColorJitter, Compose, Normalize, RandomCropResize, ResizeImages, Unnormalize
from craftvla.errors import ConfigError, CraftVLAError

STATS = {
    "observation.state": {"mean": np.array([1.0, -2.0]), "std": np.array([2.0, 0.5]),
                          "min": np.array([0.0, 0.0]), "max": np.array([1.0, 1.0])},
    "action": {"min": np.array([-1.0, 0.0, 2.0]), "max": np.array([3.0, 10.0, 2.0]),
               "mean": np.zeros(3), "std": np.ones(3)},
    "observation.images.cam": {"mean": np.full((3, 1, 1), 0.5), "std": np.full((3, 1, 1), 0.25)},
}
MAPPING = {"observation.state": "mean_std", "action": "min_max", "observation.images.cam": "identity"}


def test_normalize_hand_computed_values():
    item = {"observation.state": torch.tensor([3.0, -1.0]), "action": torch.tensor([[1.0, 5.0, 2.0]]), "task": "x"}
    out = Normalize(STATS, MAPPING)(item)
    torch.testing.assert_close(out["observation.state"], torch.tensor([1.0, 2.0]))  # (3-1)/2, (-1+2)/0.5
    # min_max to [-1, 1]: 2*(1+1)/4-1 = 0, 2*5/10-1 = 0; constant dim (max == min) stays finite
    torch.testing.assert_close(out["action"], torch.tensor([[0.0, 0.0, -1.0]]))
    assert out["task"] == "x" and torch.equal(item["observation.state"], torch.tensor([3.0, -1.0]))  # not mutated
    assert out is not item


def test_round_trip_any_leading_dims():
    norm, unnorm = Normalize(STATS, MAPPING), Unnormalize(STATS, MAPPING)
    batch = {"observation.state": torch.randn(4, 2), "action": torch.randn(4, 8, 3) * 3,
             "observation.images.cam": torch.rand(4, 3, 8, 8)}
    back = unnorm(norm(batch))
    for k in batch:
        torch.testing.assert_close(back[k], batch[k], rtol=1e-5, atol=1e-5)
    assert torch.equal(norm(batch)["observation.images.cam"], batch["observation.images.cam"])  # identity


def test_normalize_image_stats_broadcast_per_channel():
    st = {"observation.images.cam": STATS["observation.images.cam"]}
    out = Normalize(st, {"observation.images.cam": "mean_std"})({"observation.images.cam": torch.full((2, 3, 4, 4), 0.75)})
    torch.testing.assert_close(out["observation.images.cam"], torch.ones(2, 3, 4, 4))


def test_bad_mapping_and_missing_stats():
    with pytest.raises(ConfigError, match="zscore"):
        Normalize(STATS, {"action": "zscore"})
    with pytest.raises(CraftVLAError, match="observation.velocity"):
        Normalize(STATS, {"observation.velocity": "mean_std"})


def test_image_transforms_shapes_ranges_and_purity():
    torch.manual_seed(0)
    img = torch.rand(3, 48, 64)
    item = {"observation.images.cam": img, "action": torch.zeros(8, 4)}
    t = Compose([RandomCropResize(0.9), ColorJitter(), ResizeImages(32)])
    out = t(item)
    assert out["observation.images.cam"].shape == (3, 32, 32)
    assert 0.0 <= out["observation.images.cam"].min() and out["observation.images.cam"].max() <= 1.0
    assert out["action"] is item["action"] and item["observation.images.cam"] is img
    crop = RandomCropResize(0.9)({"observation.images.cam": torch.rand(2, 3, 48, 64)})
    assert crop["observation.images.cam"].shape == (2, 3, 48, 64)
    # resizing a constant image keeps its value
    const = ResizeImages((24, 20))({"observation.images.cam": torch.full((3, 48, 64), 0.3)})
    torch.testing.assert_close(const["observation.images.cam"], torch.full((3, 24, 20), 0.3))
