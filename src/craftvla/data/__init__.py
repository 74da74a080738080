"""LeRobot v3.0 datasets (read and write, no `lerobot` dependency) and data transforms.

from craftvla.data import LeRobotDataset, LeRobotDatasetWriter
ds = LeRobotDataset(root, chunk_size=8)   # len(ds) == total frames; ds[i] -> dict of tensors
"""

from .lerobot import LeRobotDataset
from .lerobot_meta import DatasetMeta, load_meta
from .transforms import ColorJitter, Compose, Normalize, RandomCropResize, ResizeImages, Unnormalize
from .writer import LeRobotDatasetWriter

__all__ = [
    "ColorJitter",
    "Compose",
    "DatasetMeta",
    "LeRobotDataset",
    "LeRobotDatasetWriter",
    "Normalize",
    "RandomCropResize",
    "ResizeImages",
    "Unnormalize",
    "load_meta",
]
