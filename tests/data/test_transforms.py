"""Normalize / Unnormalize against hand-computed values; image transforms keep shapes; purity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from craftvla.data import ColorJitter, Compose, Normalize, RandomCropResize, ResizeImages, Unnormalize
from craftvla.errors import ConfigError, CraftVLAError

STATS = {
    "observation.state": {
        "mean": np.array([1.0, -2.0]),
        "std": np.array([2.0, 0.5]),
        "min": np.array([0.0, 0.0]),
        "max": np.array([1.0, 1.0]),
    },
    "action": {
        "min": np.array([-1.0, 0.0, 2.0]),
        "max": np.array([3.0, 10.0, 2.0]),
        "mean": np.zeros(3),
        "std": np.ones(3),
    },
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
    batch = {
        "observation.state": torch.randn(4, 2),
        "action": torch.randn(4, 8, 3) * 3,
        "observation.images.cam": torch.rand(4, 3, 8, 8),
    }
    back = unnorm(norm(batch))
    for k in batch:
        torch.testing.assert_close(back[k], batch[k], rtol=1e-5, atol=1e-5)
    assert torch.equal(norm(batch)["observation.images.cam"], batch["observation.images.cam"])  # identity


def test_normalize_image_stats_broadcast_per_channel():
    st = {"observation.images.cam": STATS["observation.images.cam"]}
    out = Normalize(st, {"observation.images.cam": "mean_std"})(
        {"observation.images.cam": torch.full((2, 3, 4, 4), 0.75)}
    )
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


def test_crop_resize_zooms_into_a_sub_window():
    """A horizontal ramp stays a ramp, narrowed to the crop's sqrt(0.9) of the width; scale 1 is identity."""
    torch.manual_seed(0)
    ramp = torch.linspace(0.0, 1.0, 64).expand(2, 3, 64, 64).clone()  # (B, 3, H, W): value = column
    for _ in range(5):
        out = RandomCropResize(0.9)({"observation.images.cam": ramp})["observation.images.cam"]
        torch.testing.assert_close(out[0], out[1])  # one crop for every frame of the call
        assert torch.allclose(out[:, :, 0], out[:, :, -1])  # rows untouched by a horizontal ramp
        row = out[0, 0, 0]
        assert (row.diff() > 0).all()  # still increasing left to right
        span = float(row[-1] - row[0])  # the crop keeps 61 of 64 columns: about 0.95 of the span
        assert 0.90 < span < 0.99, span
    same = RandomCropResize(1.0)({"observation.images.cam": ramp})["observation.images.cam"]
    torch.testing.assert_close(same, ramp)


def test_color_jitter_brightness_scales_within_its_range_and_clamps():
    torch.manual_seed(0)
    jitter = ColorJitter(brightness=0.2, contrast=0.0, saturation=0.0, hue=0.0)
    factors = []
    for _ in range(20):
        out = jitter({"observation.images.cam": torch.full((3, 8, 8), 0.5)})["observation.images.cam"]
        assert torch.allclose(out, out.flatten()[0].expand_as(out))  # a uniform gain
        factors.append(float(out.flatten()[0]) / 0.5)
    assert min(factors) >= 0.8 - 1e-6 and max(factors) <= 1.2 + 1e-6
    assert max(factors) - min(factors) > 0.1  # it does vary from call to call
    bright = ColorJitter(brightness=(1.5, 1.5), contrast=0.0, saturation=0.0, hue=0.0)
    out = bright({"observation.images.cam": torch.tensor([0.2, 0.9]).view(1, 1, 2).expand(3, 1, 2)})
    torch.testing.assert_close(out["observation.images.cam"][0, 0], torch.tensor([0.3, 1.0]))  # 1.35 clamps
