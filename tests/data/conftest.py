"""Fixtures for the data tests (helpers live in lerobot_synth.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from lerobot_synth import write_dataset


@pytest.fixture(scope="session")
def dataset_root(tmp_path_factory) -> Path:
    """Four episodes (lengths 12, 9, 15, 6) sharing one parquet file and one mp4."""
    return write_dataset(tmp_path_factory.mktemp("ds") / "shared", [12, 9, 15, 6])
