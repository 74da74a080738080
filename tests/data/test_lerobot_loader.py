"""The dataset through a torch DataLoader with worker processes, plus transforms."""

from __future__ import annotations

import torch
from lerobot_synth import CAM
from torch.utils.data import DataLoader

from craftvla.data import Compose, LeRobotDataset, Normalize, ResizeImages


def test_dataloader_two_workers_default_collate(dataset_root):
    ds = LeRobotDataset(dataset_root, chunk_size=4)
    ds[0]  # open a decoder in the parent: workers must not inherit or pickle it
    loader = DataLoader(ds, batch_size=8, shuffle=True, num_workers=2, generator=torch.Generator().manual_seed(0))
    seen = []
    for batch in loader:
        b = batch["index"].shape[0]
        assert batch[CAM].shape == (b, 3, 48, 64) and batch["action"].shape == (b, 4, 4)
        assert batch["action_is_pad"].dtype == torch.bool
        assert isinstance(batch["task"], list) and all(isinstance(t, str) for t in batch["task"])
        assert batch["timestamp"].dtype == torch.float64
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(len(ds)))


def test_transform_is_applied_per_item(dataset_root):
    ds = LeRobotDataset(dataset_root)
    t = Compose([ResizeImages(32), Normalize(ds.stats, {"observation.state": "mean_std", "action": "min_max"})])
    item = LeRobotDataset(dataset_root, transform=t)[3]
    assert item[CAM].shape == (3, 32, 32)
    assert item["action"].min() >= -1.0 - 1e-6 and item["action"].max() <= 1.0 + 1e-6
    raw = ds[3]["observation.state"]
    expected = (raw - torch.tensor(ds.stats["observation.state"]["mean"])) / (
        torch.tensor(ds.stats["observation.state"]["std"]) + 1e-8
    )
    torch.testing.assert_close(item["observation.state"], expected)
