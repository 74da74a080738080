"""Starting child Python processes from tests: a free port for distributed runs, and a timeout
sized for a loaded 2-core machine (an interpreter that imports torch can take tens of seconds
there while the other pytest worker runs)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT_S = 900


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it), for a rendezvous on localhost."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_child(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    """Run `cmd` from the repository root with one intra-op thread; fail the test with its stderr."""
    done = subprocess.run(
        cmd,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def torchrun(nproc: int, *args: str) -> list[str]:
    """`python -m torch.distributed.run` on localhost with a fresh port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        *args,
    ]


def accelerate_launch(nproc: int, *args: str) -> list[str]:
    """`accelerate launch` of `nproc` processes (--multi_gpu: the multi-process launcher; on a CPU
    machine it runs them under torchrun with gloo) on a fresh port."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(nproc),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        *args,
    ]
