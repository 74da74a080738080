"""`craftvla serve`: openpi's wire format and client (the real `openpi-client` package) against our
server, errors that close one connection while the server goes on, API key, health check,
batching, graceful shutdown, and a Meta-World episode driven over the socket."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from openpi_client import msgpack_numpy
from openpi_client.websocket_client_policy import WebsocketClientPolicy

from craftvla.errors import CraftVLAError
from craftvla.serve import protocol
from craftvla.serve.client import PolicyClient
from tests.launch import CHILD_TIMEOUT_S, ROOT, free_port

from .conftest import CAM, observation, running_server


def test_wire_format_is_openpis_both_ways():
    message = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.uint8(7),
        "c": [1, "x"],
        "img": np.zeros((4, 4, 3), np.uint8),
    }
    for back in (msgpack_numpy.unpackb(protocol.pack(message)), protocol.unpack(msgpack_numpy.packb(message))):
        assert back.keys() == message.keys() and back["c"] == [1, "x"] and back["b"] == 7
        for key in ("a", "img"):
            assert back[key].dtype == message[key].dtype
            np.testing.assert_array_equal(back[key], message[key])
    with pytest.raises(CraftVLAError, match="object"):
        protocol.pack({"x": np.array([object()])})
    forged = msgpack_numpy.packb({"x": np.zeros(3)}).replace(b"<f8", b"|O8")
    with pytest.raises(CraftVLAError, match="refusing"):
        protocol.unpack(forged)
    with pytest.raises(CraftVLAError, match="not a msgpack message"):
        protocol.unpack(b"\xc1garbage")


def test_openpi_client_gets_the_actions_infer_gives(policy):
    with running_server(policy) as server:
        client = WebsocketClientPolicy(host="127.0.0.1", port=server.port)
        meta = client.get_server_metadata()
        assert meta["camera_keys"] == [CAM] and meta["chunk_size"] == policy.config.chunk_size
        for seed in range(3):
            obs = observation(seed)
            reply = client.infer({**{k: v for k, v in obs.items() if k != "task"}, "prompt": obs["task"]})
            assert reply["actions"].shape == (policy.config.chunk_size, 4) and reply["actions"].dtype == np.float32
            np.testing.assert_allclose(reply["actions"], policy.infer(obs), atol=1e-6)
            assert reply["server_timing"]["infer_ms"] > 0 and reply["server_timing"]["batch_size"] == 1
        assert "prev_total_ms" in reply["server_timing"]


def test_a_bad_request_closes_its_connection_and_the_next_one_is_served(policy):
    with running_server(policy) as server:
        url = f"ws://127.0.0.1:{server.port}"
        openpi = WebsocketClientPolicy(host="127.0.0.1", port=server.port)
        broken = {k: v for k, v in observation().items() if k != "observation.state"}
        with pytest.raises(RuntimeError, match="Error in inference server:\ncraftvla serve: .*lacks"):
            openpi.infer(broken)
        with PolicyClient(url) as client:
            with pytest.raises(CraftVLAError, match="expects \\(4,\\)"):
                client.infer({**observation(), "observation.state": np.zeros(3, np.float32)})
            with pytest.raises(CraftVLAError, match="connection closed"):
                client.infer(observation())  # that connection is gone ...
        with PolicyClient(url) as client:  # ... the server is not
            np.testing.assert_allclose(client.actions(observation(1)), policy.infer(observation(1)), atol=1e-6)


def test_api_key_and_health_check(policy):
    with running_server(policy, api_key="s3cret") as server:
        url = f"ws://127.0.0.1:{server.port}"
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=30) as response:
            assert response.status == 200 and response.read() == b"OK\n"
        for key in (None, "wrong"):
            with pytest.raises(CraftVLAError, match="HTTP 401: missing or wrong API key"):
                PolicyClient(url, api_key=key)
        with PolicyClient(url, api_key="s3cret") as client:
            assert client.actions(observation()).shape == (policy.config.chunk_size, 4)
        openpi = WebsocketClientPolicy(host="127.0.0.1", port=server.port, api_key="s3cret")
        assert openpi.infer(observation())["actions"].shape == (policy.config.chunk_size, 4)


class SlowFirstCall:
    """Wraps a policy: the first batch takes 1 s, so the requests sent meanwhile queue up."""

    def __init__(self, policy):
        self.policy, self.config, self.processor, self.sizes = policy, policy.config, policy.processor, []

    def infer_batch(self, observations):
        self.sizes.append(len(observations))
        if len(self.sizes) == 1:
            time.sleep(1.0)
        return self.policy.infer_batch(observations)


def test_requests_waiting_together_run_as_one_batch_with_the_same_actions(policy):
    slow = SlowFirstCall(policy)
    with running_server(slow, max_batch=8) as server:
        url = f"ws://127.0.0.1:{server.port}"
        clients = [PolicyClient(url) for _ in range(4)]
        replies = {}

        def ask(i):
            replies[i] = clients[i].infer(observation(i))

        first = threading.Thread(target=ask, args=(0,))
        first.start()
        time.sleep(0.3)  # request 0 is in its slow batch; 1..3 arrive meanwhile
        rest = [threading.Thread(target=ask, args=(i,)) for i in (1, 2, 3)]
        for t in [*rest]:
            t.start()
        for t in [first, *rest]:
            t.join(timeout=60)
        for c in clients:
            c.close()
    assert slow.sizes == [1, 3]
    assert [replies[i]["server_timing"]["batch_size"] for i in range(4)] == [1, 3, 3, 3]
    for i in range(4):  # batching changes nothing about each request's answer
        np.testing.assert_allclose(replies[i]["actions"], policy.infer(observation(i)), atol=1e-5)


def test_serve_command_stops_gracefully_on_sigterm(policy, tmp_path):
    policy.save_pretrained(tmp_path / "ckpt")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "craftvla", "serve", "--checkpoint", str(tmp_path / "ckpt"), "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
                    assert response.status == 200
                    break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None and time.monotonic() < deadline, (
                    proc.stdout.read() if proc.poll() else "timeout"
                )
                time.sleep(0.5)
        client = PolicyClient(f"ws://127.0.0.1:{port}")
        assert client.actions(observation()).shape == (policy.config.chunk_size, 4)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        assert "stopped" in out and "Traceback" not in out
        with pytest.raises(CraftVLAError, match="connection closed"):
            client.infer(observation())
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_metaworld_episode_over_the_socket_equals_the_in_process_one():
    """The shipped generalist served; the example drives drawer-close through the socket and
    succeeds on the same step as the in-process rollout of the same position."""
    sys.path.insert(0, str(ROOT / "examples"))
    from serve_metaworld import run_episode

    from craftvla.model.policy import VLAPolicy
    from craftvla.sim.metaworld import EVAL_STREAM
    from craftvla.sim.policies import CheckpointPolicy
    from craftvla.sim.rollout import RolloutSpec, run_episodes

    generalist = VLAPolicy.from_pretrained(ROOT / "assets" / "generalist" / "checkpoint").eval()
    with running_server(generalist) as server:
        success, steps = run_episode(f"ws://127.0.0.1:{server.port}", "drawer-close-v3", seed=0, execute_steps=4)
    spec = RolloutSpec(
        seed=0, stream=EVAL_STREAM, max_steps=200, execute_steps=4, image_size=generalist.config.vision.image_size
    )
    (local,) = run_episodes(CheckpointPolicy(generalist), "drawer-close-v3", 1, spec)
    assert success and local.success and steps == local.length


def test_eval_runs_against_a_server(policy, tmp_path):
    from craftvla.sim.evaluate import main

    with running_server(policy) as server:
        assert (
            main(
                [
                    "--policy",
                    "server",
                    "--server",
                    f"ws://127.0.0.1:{server.port}",
                    "--tasks",
                    "drawer-close-v3",
                    "--episodes",
                    "2",
                    "--max_steps",
                    "6",
                    "--num_envs",
                    "2",
                    "--num_videos",
                    "0",
                    "--out",
                    str(tmp_path / "eval"),
                ]
            )
            == 0
        )
    assert (tmp_path / "eval" / "results.json").is_file()
