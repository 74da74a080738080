"""What a policy refuses to act on, in process (`policy.infer`) and over the socket, and what every
bad request gets back: a short text frame naming the problem, then the documented close."""

from __future__ import annotations

import logging

import msgpack
import numpy as np
import pytest
import torch
from websockets.sync.client import connect

from craftvla.errors import ConfigError, CraftVLAError
from craftvla.model.observations import ObservationLimits
from craftvla.serve import protocol
from craftvla.serve.server import MAX_REASON_CHARS, ServeConfig, resolve_api_key

from .conftest import CAM, observation, running_server


def _refused(policy, message: str, **changes):
    with pytest.raises(CraftVLAError, match=message):
        policy.infer({**observation(), **changes})


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_state_is_refused_naming_the_dimension(policy, value):
    state = np.zeros(4, np.float32)
    state[2] = value
    _refused(
        policy,
        r"observation 0: observation.state\[2\] is (nan|inf|-inf); every value must be finite",
        **{"observation.state": state},
    )


def test_absurd_state_is_refused_beyond_the_tolerance_of_the_training_range(policy):
    # the fixture's training range is [-1, 1] (width 2); the default tolerance is 10 widths each side
    state = np.zeros(4, np.float32)
    state[1] = 1e30
    _refused(
        policy,
        r"observation.state\[1\] = 1e\+30 is far outside the training range \(accepted: \[-21, 21\]\)",
        **{"observation.state": state},
    )
    state[1] = 20.9  # inside the tolerance: served
    assert np.isfinite(policy.infer({**observation(), "observation.state": state})).all()
    policy.processor.limits = ObservationLimits(state_tolerance=0.0)  # exactly the training range
    try:
        _refused(policy, r"accepted: \[-1, 1\]", **{"observation.state": np.full(4, 1.5, np.float32)})
    finally:
        policy.processor.limits = ObservationLimits()


def test_a_state_of_strings_or_the_wrong_size_is_refused(policy):
    _refused(
        policy,
        r"observation.state is <U1 \(4,\); the policy expects \(4,\) numbers",
        **{"observation.state": np.array(list("abcd"))},
    )
    _refused(policy, r"expects \(4,\)", **{"observation.state": np.zeros(3, np.float32)})


@pytest.mark.parametrize("task", [None, 123, b"bytes", ["close"]])
def test_a_task_that_is_not_a_string_is_refused(policy, task):
    _refused(policy, f"observation 0: task is a {type(task).__name__}; expected the instruction string", task=task)


def test_an_overlong_task_is_refused_and_a_long_one_is_cut_before_tokenising(policy, monkeypatch):
    _refused(policy, "task has 10,001 characters; at most 10,000 are accepted", task="x" * 10_001)
    seen = []
    tokenize = policy.processor.tokenize
    monkeypatch.setattr(
        policy.processor, "tokenize", lambda tasks, **kw: seen.append(list(tasks)) or tokenize(tasks, **kw)
    )
    long = "close the drawer " * 500  # 8,500 characters
    actions = policy.infer(observation(task=long))
    cut = 32 * policy.config.llm.max_text_tokens
    assert len(seen[-1][0]) == cut < len(long)
    # the tokenizer keeps max_text_tokens tokens either way: the cut changes no action
    monkeypatch.setattr(policy.processor.limits, "task_chars_per_token", 10_000)
    np.testing.assert_array_equal(policy.infer(observation(task=long)), actions)
    assert len(seen[-1][0]) == len(long)


@pytest.mark.parametrize(
    "shape,dtype,message",
    [
        ((3, 3, 3), np.uint8, r"is 3 x 3; each side must be in \[4, 2048\]"),  # micro: 32 px / 8 px patches = 4
        ((2049, 8, 3), np.uint8, r"is 2049 x 8; each side must be in \[4, 2048\]"),
        ((32, 32, 3), np.float32, r"is float32 \(32, 32, 3\); expected \(H, W, 3\) uint8"),
        ((32, 32), np.uint8, r"is uint8 \(32, 32\); expected \(H, W, 3\) uint8"),
    ],
)
def test_images_out_of_bounds_are_refused(policy, shape, dtype, message):
    _refused(policy, f"observation 0: {CAM} {message}", **{CAM: np.zeros(shape, dtype)})


def test_non_finite_actions_never_reach_the_caller(policy, monkeypatch):
    chunk = torch.zeros(2, policy.config.chunk_size, policy.config.action_dim)
    chunk[1, 0, 0] = float("nan")  # the action clip lets NaN through: the check after it must not
    monkeypatch.setattr(policy, "predict_action_chunk", lambda batch: chunk)
    with pytest.raises(CraftVLAError, match=r"non-finite actions for observation\(s\) \[1\]; refusing"):
        policy.infer_batch([observation(0), observation(1)])


# ----- over the socket -------------------------------------------------------------------------------


def _exchange(url: str, payload, headers=None):
    """Send one frame; (the reply frame, the close code, the close reason)."""
    with connect(url, compression=None, max_size=None, additional_headers=headers) as ws:
        ws.recv()  # metadata
        ws.send(payload)
        reply = ws.recv()
        if isinstance(reply, str):  # a refusal: the close follows
            try:
                ws.recv(timeout=10)
            except Exception:  # noqa: BLE001  the close is what we wait for
                pass
        return reply, ws.close_code, ws.close_reason


def _raw(obs: dict) -> bytes:
    return protocol.pack(obs)


FORGED = {
    "invalid UTF-8 in the task": (
        lambda: _raw({**observation(), "task": b"\xff\xfe close"}),
        "task is not valid UTF-8",
    ),
    "an ndarray without data": (
        lambda: msgpack.packb(
            {
                **{k: v for k, v in observation().items() if k != CAM},
                CAM: {b"__ndarray__": True, b"shape": [32, 32, 3]},
            },
            default=protocol._encode,
        ),
        "an encoded NumPy value without its 'dtype' field",
    ),
    "an ndarray with a bad shape": (
        lambda: msgpack.packb({CAM: {b"__ndarray__": True, b"dtype": "|u1", b"shape": "big", b"data": b""}}),
        "an array shape must be a list of non-negative integers",
    ),
    "a map of 200k keys": (lambda: msgpack.packb({f"key{i}": i for i in range(200_000)}), "observation 0 lacks"),
    "a NaN state": (
        lambda: _raw({**observation(), "observation.state": np.full(4, np.nan, np.float32)}),
        "must be finite",
    ),
    "a task of None": (lambda: _raw({**observation(), "task": None}), "task is a NoneType"),
    "a 3 x 3 image": (lambda: _raw({**observation(), CAM: np.zeros((3, 3, 3), np.uint8)}), "is 3 x 3"),
    "not msgpack": (lambda: b"\xc1garbage", "not a msgpack message"),
}


@pytest.mark.parametrize("case", list(FORGED))
def test_every_bad_request_gets_a_short_reason_then_the_documented_close(policy, case, caplog):
    make, words = FORGED[case]
    with running_server(policy) as server, caplog.at_level(logging.ERROR):
        url = f"ws://127.0.0.1:{server.port}"
        reply, code, reason = _exchange(url, make())
        assert isinstance(reply, str) and reply.startswith("craftvla serve: ") and words in reply, reply
        assert len(reply) <= MAX_REASON_CHARS
        assert (code, reason) == (1011, "bad request; the reason is in the previous frame")
        reply, _, _ = _exchange(url, _raw(observation()))  # the server goes on
        assert protocol.unpack(reply)["actions"].shape == (policy.config.chunk_size, 4)
    assert not [r for r in caplog.records if r.exc_info], "a bad request left a traceback in the log"


def test_two_authorization_headers_are_refused_with_400(policy):
    from websockets.exceptions import InvalidStatus

    with running_server(policy, api_key="k") as server:
        url = f"ws://127.0.0.1:{server.port}"
        for key_first in ("Api-Key k", "Api-Key wrong"):
            with pytest.raises(InvalidStatus) as err:
                connect(url, additional_headers=[("Authorization", key_first), ("Authorization", "Api-Key k")])
            assert err.value.response.status_code == 400
            assert err.value.response.body == b"more than one Authorization header\n"


# ----- the API key off the command line --------------------------------------------------------------


def test_api_key_from_a_file_or_the_environment(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("CRAFTVLA_API_KEY", raising=False)
    assert resolve_api_key(ServeConfig()) == ""
    monkeypatch.setenv("CRAFTVLA_API_KEY", "from-env")
    assert resolve_api_key(ServeConfig()) == "from-env"
    (tmp_path / "key").write_text("from-file\n")
    assert resolve_api_key(ServeConfig(api_key_file=str(tmp_path / "key"))) == "from-file"
    with caplog.at_level(logging.WARNING, logger="craftvla.serve.server"):
        assert resolve_api_key(ServeConfig(api_key="on-the-command-line")) == "on-the-command-line"
    assert "visible to every local user" in caplog.text
    with pytest.raises(ConfigError, match="not both"):
        resolve_api_key(ServeConfig(api_key="a", api_key_file=str(tmp_path / "key")))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="expected one non-empty line"):
        resolve_api_key(ServeConfig(api_key_file=str(tmp_path / "empty")))


def test_serve_refuses_an_unreadable_key_file_before_loading_anything(tmp_path, capsys):
    from craftvla.cli import main

    assert main(["serve", "--api_key_file", str(tmp_path / "missing"), "--checkpoint", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert "--api_key_file=" in err and "cannot read it (FileNotFoundError)" in err and "Traceback" not in err
