"""Suite-wide settings, applied before any test module imports torch or mujoco."""

import os

# `make test` runs two pytest workers on two cores: one intra-op thread each. With torch's default
# (one thread per core) the workers oversubscribe the cores and small ops slow down tens of times
# (measured here: one tiny encode+backward 1.7 s with 2 threads under load vs 0.03 s with 1).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("MUJOCO_GL", "egl")

import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
