"""2-process gloo DDP (torchrun) equals one process on the combined batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_two_rank_gloo_equals_single_process(tmp_path):
    out = tmp_path / "ddp.json"
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["max_abs_diff"] <= 1e-5 * max(result["grad_scale"], 1.0)
    for key, value in result["ref_log"].items():
        assert result["log"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
