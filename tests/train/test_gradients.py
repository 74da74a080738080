"""Gradient equivalences of `train_step`: accumulation 2 x 4 == batch 8; 2-process DDP == 1 process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("grad_step.py")
ROOT = Path(__file__).resolve().parents[2]


def _run(out: Path, *args: str, procs: int = 1) -> dict:
    if procs == 1:  # in-process: same code path, no interpreter start-up
        from tests.train import grad_step

        accum = int(args[args.index("--accum") + 1]) if "--accum" in args else 1
        grad_step.main(str(out), accum, "--craft" in args)
        return torch.load(out, weights_only=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
           "--master_port", str(29500 + os.getpid() % 1000), str(SCRIPT), str(out), *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=True)


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("craft", [False, True], ids=["plain", "craft"])
def test_accumulation_and_ddp_equal_one_big_batch(tmp_path, craft):
    flag = ("--craft",) if craft else ()
    big = _run(tmp_path / "big.pt", *flag)  # 1 process, one micro-batch of 8
    accum = _run(tmp_path / "accum.pt", "--accum", "2", *flag)  # 1 process, 2 micro-batches of 4
    ddp = _run(tmp_path / "ddp.pt", *flag, procs=2)  # 2 processes (gloo), 4 samples each
    assert ddp["world"] == 2 and big["world"] == 1
    scale = max(g.abs().max().item() for g in big["grads"].values())
    assert scale > 1e-2  # the comparison is not between zeros
    # the gradients applied by SGD agree to float32 round-off (a missed all-reduce differs by ~0.4)
    assert _max_diff(big["grads"], accum["grads"]) < 1e-5 * scale
    assert _max_diff(big["grads"], ddp["grads"]) < 1e-5 * scale
    assert abs(big["loss"] - accum["loss"]) < 1e-6
    changed = [k for k, g in big["grads"].items() if g.abs().max() > 0]
    assert len(changed) > 0.8 * len(big["grads"])
    if craft:  # the surgery saw the same rank-averaged, accumulated g_act and g_ret everywhere
        assert big["craft"]["craft/retention_loss"] > 1e-6 and big["craft"]["craft/beta"] != 1.0
        for other in (accum, ddp):
            for key, value in big["craft"].items():
                assert abs(other["craft"][key] - value) <= 1e-4 * max(abs(value), 1e-3), key
