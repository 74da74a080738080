"""Seeded fuzzing of what a client can send: every generated request gets actions or a short error
naming the problem, nothing else escapes the decoder or the validator, the server survives, and
its memory stays bounded. Bounded: a few hundred requests, seconds."""

from __future__ import annotations

import resource

import msgpack
import numpy as np
from websockets.sync.client import connect

from craftvla.errors import CraftVLAError
from craftvla.serve import protocol
from craftvla.serve.server import MAX_REASON_CHARS, _observation, short_reason

from .conftest import CAM, observation, running_server

DTYPES = ["|u1", "<f4", "<f8", "<i8", "|b1", "<U3", "|O", "<c8", "|V4", "bogus", 7]
VALUES = [None, True, 0, -1, 2**63, 1e308, float("nan"), "", "x" * 50, b"\xff\xfe", [], {}, [1, [2, [3]]]]


def _array(rng) -> dict:
    """An encoded ndarray, sometimes inconsistent (shape vs bytes, refused dtypes, missing fields)."""
    shape = [int(n) for n in rng.integers(0, 40, size=rng.integers(0, 4))]
    enc = {
        b"__ndarray__": True,
        b"dtype": DTYPES[rng.integers(len(DTYPES))],
        b"shape": shape,
        b"data": bytes(rng.integers(0, 256, size=rng.integers(0, 5000), dtype=np.uint8)),
    }
    for key in (b"dtype", b"shape", b"data"):
        if rng.random() < 0.1:
            del enc[key]
    if rng.random() < 0.1:
        enc[b"shape"] = VALUES[rng.integers(len(VALUES))]
    return enc


def _value(rng):
    kind = rng.integers(4)
    if kind == 0:
        return VALUES[rng.integers(len(VALUES))]
    if kind == 1:
        return _array(rng)
    if kind == 2:
        return rng.normal(size=rng.integers(0, 6)).astype(np.float32) * 10.0 ** rng.integers(-3, 40)
    return rng.integers(0, 256, size=(int(rng.integers(1, 40)), int(rng.integers(1, 40)), 3), dtype=np.uint8)


def fuzz_request(rng) -> bytes:
    """A valid observation with one to three fields replaced, added or dropped; or its bytes mangled."""
    obs = dict(observation(int(rng.integers(1000))))
    for _ in range(rng.integers(1, 4)):
        key = [CAM, "observation.state", "task", "prompt", "extra"][rng.integers(5)]
        if rng.random() < 0.2:
            obs.pop(key, None)
        else:
            obs[key] = _value(rng)
    data = msgpack.packb(obs, default=protocol._encode, use_bin_type=True)
    if rng.random() < 0.25:  # flip bytes or cut the message short
        data = bytearray(data)
        for i in rng.integers(0, len(data), size=rng.integers(1, 8)):
            data[i] = int(rng.integers(256))
        data = bytes(data[: rng.integers(1, len(data) + 1)])
    return data


def _rss_mb() -> float:
    """Resident memory now (not the peak: earlier tests in this process must not hide growth)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def test_decoder_and_validator_answer_every_generated_request(policy):
    """In process: 400 requests through `_observation` + `policy.infer`: each is actions (finite) or
    a CraftVLAError, never another exception."""
    rng = np.random.default_rng(0)
    served = refused = 0
    for _ in range(400):
        try:
            actions = policy.infer(_observation(fuzz_request(rng)))
        except CraftVLAError as err:
            refused += 1
            assert len(short_reason(str(err))) <= MAX_REASON_CHARS
            continue
        served += 1
        assert actions.shape == (policy.config.chunk_size, 4) and np.isfinite(actions).all()
    assert served > 20 and refused > 200  # both paths were exercised


def test_server_survives_the_generated_requests_with_bounded_memory(policy):
    rng = np.random.default_rng(1)
    with running_server(policy) as server:
        url = f"ws://127.0.0.1:{server.port}"
        before = _rss_mb()
        for _ in range(150):
            with connect(url, compression=None, max_size=None) as ws:
                ws.recv()  # metadata
                ws.send(fuzz_request(rng))
                reply = ws.recv(timeout=30)
                if isinstance(reply, str):
                    assert reply.startswith("craftvla serve: ") and len(reply) <= MAX_REASON_CHARS
                else:
                    assert np.isfinite(protocol.unpack(reply)["actions"]).all()
        with connect(url, compression=None, max_size=None) as ws:  # still serving
            ws.recv()
            ws.send(protocol.pack(observation()))
            assert protocol.unpack(ws.recv(timeout=30))["actions"].shape == (policy.config.chunk_size, 4)
        assert _rss_mb() - before < 100  # resident growth over 150 hostile requests (server in this process)
