"""benchmarks/gpu/check.py on a machine without CUDA: one clear line, exit 2, nothing written."""

import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "check.py"


def test_without_cuda_it_stops_at_once_and_clearly():
    assert not torch.cuda.is_available()  # CI and this machine: the path under test
    results = SCRIPT.parent / "results"
    before = sorted(results.glob("*")) if results.is_dir() else []
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "needs a CUDA GPU and torch sees none" in done.stdout and "Traceback" not in done.stdout + done.stderr
    assert (sorted(results.glob("*")) if results.is_dir() else []) == before


def test_an_unknown_check_is_refused_by_name():
    done = subprocess.run([sys.executable, str(SCRIPT), "--only", "latency,speed"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown checks ['speed']" in done.stderr
