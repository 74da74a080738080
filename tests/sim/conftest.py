"""Headless MuJoCo for every simulator test (before mujoco is imported anywhere)."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")
