"""A policy server on a free port in a background thread, for the serving tests."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import numpy as np
import pytest
import torch

from craftvla import VLAPolicy
from craftvla.serve.server import PolicyServer
from tests.model.conftest import micro_config

CAM = "observation.images.corner"


@contextlib.contextmanager
def running_server(policy, **kwargs):
    """Yield a serving PolicyServer (its .port bound); stop it (as SIGTERM would) on exit."""
    server = PolicyServer(policy, port=0, **kwargs)
    loop = asyncio.new_event_loop()
    ready, stop = asyncio.Event(), None

    def run():
        nonlocal stop
        asyncio.set_event_loop(loop)
        stop = asyncio.Event()
        loop.run_until_complete(server.serve(ready=ready, stop=stop))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    for _ in range(600):
        if ready.is_set():
            break
        threading.Event().wait(0.05)
    assert ready.is_set(), "server did not start"
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=60)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    policy = VLAPolicy(micro_config()).eval()
    ones = np.ones(4, np.float32)
    policy.processor.set_stats(
        {
            k: {"mean": ones * 0.1, "std": ones * 0.5, "min": -ones, "max": ones}
            for k in ("observation.state", "action")
        },
        "test",
    )
    return policy


def observation(seed: int = 0, task: str = "close the drawer") -> dict:
    rng = np.random.default_rng(seed)
    return {
        CAM: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
        "observation.state": rng.normal(size=4).astype(np.float32),
        "task": task,
    }
