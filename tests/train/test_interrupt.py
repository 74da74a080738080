"""Ctrl-C (SIGINT) or SIGTERM during `craftvla train` writes a checkpoint of the current step and the
plots before exiting with the signal's status, and `--resume` (a bare flag) continues from it."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.train.conftest import MICRO_ARGS


def _start(out: Path, *extra: str) -> subprocess.Popen:
    args = [
        *MICRO_ARGS,
        "--log.plots",
        "true",
        "--output_dir",
        str(out),
        "--steps",
        "100000",
        "--batch_size",
        "2",
        "--log.log_freq",
        "1",
        "--checkpoint.save_freq",
        "0",
        *extra,
    ]  # no checkpoint before the end
    return subprocess.Popen(
        [sys.executable, "-m", "craftvla", "train", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_lines(path: Path, proc: subprocess.Popen, n: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"{path}: fewer than {n} lines after {timeout} s")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_writes_a_checkpoint_and_the_plots_then_resume_continues(tmp_path, sig, code):
    out = tmp_path / "run"
    proc = _start(out)
    _wait_for_lines(out / "metrics.jsonl", proc, 2)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr[-2000:]
    assert "Traceback" not in stderr
    last = out / "checkpoints" / "last"
    assert (last / "model.safetensors").is_file()
    step = int(last.resolve().name)
    assert 2 <= step < 100000
    assert f"stopped at step {step} of 100000" in stdout and "--resume" in stdout
    assert (out / "plots" / "overview.png").is_file() and (out / "plots" / "loss.png").is_file()

    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "craftvla",
            "train",
            *MICRO_ARGS,
            "--output_dir",
            str(out),
            "--steps",
            "100000",
            "--batch_size",
            "2",
            "--log.log_freq",
            "1",
            "--checkpoint.save_freq",
            "0",
            "--resume",
            "--stop_at_step",
            str(step + 2),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-3:] == [step, step + 1, step + 2]  # continued from the interrupted step
    assert int((out / "checkpoints" / "last").resolve().name) == step + 2
