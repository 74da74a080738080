"""Gradient equivalences of `train_step`: accumulation 2 x 4 == batch 8; 2-process DDP == 1 process;
clipping sees the final (post-surgery) gradient of the whole batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.launch import run_child, torchrun

SCRIPT = Path(__file__).with_name("grad_step.py")


def _run(out: Path, *args: str, procs: int = 1) -> dict:
    if procs == 1:  # in-process: same code path, no interpreter start-up
        from tests.train import grad_step

        grad_step.main(str(out), *grad_step.parse_flags(list(args)))
        return torch.load(out, weights_only=True)
    run_child(torchrun(procs, str(SCRIPT), str(out), *args))
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


def test_clipping_sees_the_whole_batch_after_the_surgery(tmp_path):
    """CRaFT + accumulation + DDP with a binding clip: every run logs the norm of the one-batch final
    gradient, and the applied gradient is that gradient scaled to exactly the clip norm."""
    free = _run(tmp_path / "free.pt", "--craft")  # 1 x 8, no clipping: the post-surgery gradient
    norm = float(sum(g.pow(2).sum() for g in free["grads"].values()).sqrt())
    clip = 0.25 * norm
    runs = [
        _run(tmp_path / "big.pt", "--craft", "--clip", str(clip)),
        _run(tmp_path / "accum.pt", "--craft", "--clip", str(clip), "--accum", "2"),
        _run(tmp_path / "ddp.pt", "--craft", "--clip", str(clip), procs=2),
    ]
    for run in runs:
        assert float(run["grad_norm"]) == pytest.approx(norm, rel=1e-5)  # logged: the pre-clip norm
        applied = float(sum(g.pow(2).sum() for g in run["grads"].values()).sqrt())
        assert applied == pytest.approx(clip, rel=1e-4)  # clipped last: nothing rescales it afterwards
        assert _max_diff({k: g * norm / clip for k, g in run["grads"].items()}, free["grads"]) < 1e-4 * norm
