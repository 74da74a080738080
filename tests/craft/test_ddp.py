"""2-process gloo DDP (torchrun) equals one process on the combined batch."""

import json
from pathlib import Path

import pytest

from tests.launch import run_child, torchrun


@pytest.mark.parametrize("retention_every", [1, 2])
def test_two_rank_gloo_equals_single_process(tmp_path, retention_every):
    """retention_every 2: the compared step all-reduces g_act alone and reuses the averaged g_ret."""
    out = tmp_path / "ddp.json"
    worker = Path(__file__).with_name("ddp_worker.py")
    run_child(torchrun(2, str(worker), str(out), str(retention_every)), PYTHONHASHSEED="0")
    result = json.loads(out.read_text())
    assert result["max_abs_diff"] <= 1e-5 * max(result["grad_scale"], 1.0)
    for key, value in result["ref_log"].items():
        assert result["log"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
