"""A bounded server: message size, open connections, queued requests and time per request each have
a limit with a clear answer beyond it, and the request of a client that left is never computed."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosedError
from websockets.sync.client import connect

from craftvla.errors import CraftVLAError
from craftvla.serve import protocol
from craftvla.serve.client import PolicyClient
from craftvla.serve.server import ServerLimits

from .conftest import CAM, observation, running_server


class Gate:
    """Wraps a policy: infer_batch waits for `release` (requests pile up meanwhile) and records the
    tasks it computed."""

    def __init__(self, policy):
        self.policy, self.config, self.processor = policy, policy.config, policy.processor
        self.entered, self.release, self.tasks = threading.Event(), threading.Event(), []

    def infer_batch(self, observations):
        self.entered.set()
        assert self.release.wait(timeout=60)
        self.tasks += [o["task"] for o in observations]
        return self.policy.infer_batch(observations)


def _open(url: str):
    ws = connect(url, compression=None, max_size=None).__enter__()  # closed by the caller
    ws.recv()  # metadata
    return ws


def _refusal(ws, starts: str, code: int) -> None:
    """The server's answer on `ws` is a text frame starting with `starts`, then a close with `code`."""
    reply = ws.recv(timeout=10)
    assert isinstance(reply, str) and reply.startswith(starts), reply
    with pytest.raises(ConnectionClosedError):
        ws.recv(timeout=10)
    assert ws.close_code == code


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_a_message_over_the_size_limit_is_closed_1009_and_others_are_served(policy):
    limits = ServerLimits(max_message_mb=0.01)  # 10,485 bytes: one 32 x 32 image fits, a 64 x 64 one not
    with running_server(policy, limits=limits) as server:
        url = f"ws://127.0.0.1:{server.port}"
        with _open(url) as ws:
            ws.send(protocol.pack({**observation(), CAM: np.zeros((64, 64, 3), np.uint8)}))
            with pytest.raises(ConnectionClosedError) as err:
                ws.recv(timeout=10)
            assert err.value.rcvd.code == 1009
        with PolicyClient(url) as client:
            assert client.actions(observation()).shape == (policy.config.chunk_size, 4)


def test_a_connection_past_the_limit_is_answered_503(policy):
    with running_server(policy, limits=ServerLimits(max_connections=2)) as server:
        url = f"ws://127.0.0.1:{server.port}"
        first, second = PolicyClient(url), PolicyClient(url)
        with pytest.raises(CraftVLAError, match=r"HTTP 503: busy: 2 connections open, the limit"):
            PolicyClient(url)
        first.close()
        _wait_for(lambda: server._open < 2)
        with PolicyClient(url) as third:  # a freed place is taken again
            assert third.actions(observation()).shape == (policy.config.chunk_size, 4)
        second.close()


def test_a_request_past_the_queue_limit_is_answered_busy_1013(policy):
    gate = Gate(policy)
    with running_server(gate, max_batch=1, limits=ServerLimits(max_queue=1)) as server:
        url = f"ws://127.0.0.1:{server.port}"
        try:
            a, b, c = _open(url), _open(url), _open(url)
            a.send(protocol.pack(observation(task="a")))
            assert gate.entered.wait(10)  # a is computing (held at the gate)
            b.send(protocol.pack(observation(task="b")))
            _wait_for(lambda: server._queue.qsize() == 1)  # b waits in the queue: it is full
            c.send(protocol.pack(observation(task="c")))
            _refusal(c, "craftvla serve: busy: 1 requests queued, the limit (--server.max_queue)", 1013)
        finally:
            gate.release.set()
        for ws in (a, b):
            assert protocol.unpack(ws.recv(timeout=30))["actions"].shape == (policy.config.chunk_size, 4)
            ws.close()
        assert gate.tasks == ["a", "b"]


def test_a_request_not_answered_in_time_gets_timed_out_1011(policy):
    gate = Gate(policy)
    with running_server(gate, limits=ServerLimits(request_timeout_s=0.3)) as server:
        try:
            with _open(f"ws://127.0.0.1:{server.port}") as ws:
                ws.send(protocol.pack(observation()))
                _refusal(ws, "craftvla serve: no answer within 0.3 s (--server.request_timeout_s)", 1011)
        finally:
            gate.release.set()


def test_the_request_of_a_client_that_left_is_never_computed(policy):
    gate = Gate(policy)
    with running_server(gate, max_batch=1) as server:
        url = f"ws://127.0.0.1:{server.port}"
        try:
            a = _open(url)
            a.send(protocol.pack(observation(task="a")))
            assert gate.entered.wait(10)  # a holds the inference thread
            with _open(url) as b:
                b.send(protocol.pack(observation(task="abandoned")))
                _wait_for(lambda: server._queue.qsize() == 1)
            # b is gone: its queued request is cancelled before the batcher reaches it
            _wait_for(lambda: all(future.done() for _, future in list(server._queue._queue)))
        finally:
            gate.release.set()
        assert protocol.unpack(a.recv(timeout=30))["actions"].shape == (policy.config.chunk_size, 4)
        a.close()
        with PolicyClient(url) as client:  # the batcher went on past the dropped request
            client.actions(observation(task="after"))
        assert gate.tasks == ["a", "after"]
