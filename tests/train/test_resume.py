"""Interrupted-and-resumed training reproduces the uninterrupted run exactly (CPU, same seed)."""

from __future__ import annotations

import random
import shutil

import numpy as np
import torch

from craftvla.train.loop import train
from craftvla.train.metrics import read_metrics
from tests.train.conftest import train_config


def noisy_loss(context, batch):
    """An auxiliary loss that draws from the global torch RNG: losses then depend on the RNG state,
    so equality after resume shows the RNG state was restored (the policy itself draws none)."""
    return 0.05 * torch.rand(()), {"noise_draw": 1.0}


def _flags(data, out, *extra):
    return train_config(
        out,
        "--dataset.root",
        str(data),
        "--steps",
        "6",
        "--batch_size",
        "4",
        "--grad_accum_steps",
        "2",
        "--log.log_freq",
        "1",
        "--checkpoint.save_freq",
        "3",
        "--checkpoint.keep_last",
        "2",
        "--schedule.warmup_steps",
        "2",
        "--seed",
        "3",
        *extra,
    )


def test_resume_reproduces_uninterrupted_losses(tiny_dataset, tmp_path):
    full = tmp_path / "full"
    train(_flags(tiny_dataset, full), aux_losses={"noise": noisy_loss})

    part = tmp_path / "part"
    train(_flags(tiny_dataset, part, "--stop_at_step", "4"), aux_losses={"noise": noisy_loss})  # saves 3 and 4
    with open(part / "metrics.jsonl", "a") as f:  # a line logged after the checkpoint, then a crash
        f.write('{"step": 5, "loss": 123.0}\n')
    (part / "checkpoints" / "last").unlink()  # as if killed before step 4's checkpoint was published
    shutil.rmtree(part / "checkpoints" / "000004")
    (part / "checkpoints" / "last").symlink_to("000003")
    torch.manual_seed(999), np.random.seed(999), random.seed(999)  # a fresh process's RNG
    train(_flags(tiny_dataset, part, "--resume", "true", "--log.plots", "true"), aux_losses={"noise": noisy_loss})

    a, b = read_metrics(full / "metrics.jsonl"), read_metrics(part / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]  # lines after step 3 were replaced
    for ra, rb in zip(a, b):
        for key in ("loss", "l1_loss", "aux/noise", "grad_norm", "lr"):
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])
    lrs = [r["lr"] for r in a]  # one linear warm-up (transformers: step 0 has LR 0), then cosine decay
    assert lrs[0] < lrs[1] < lrs[2] == 3e-4 > lrs[3] > lrs[4] > lrs[5] >= 3e-5
    ckpts = sorted(p.name for p in (part / "checkpoints").iterdir())
    assert ckpts == ["000003", "000006", "last"]  # keep_last 2
    assert (part / "plots" / "loss.png").stat().st_size > 1000
    fa, fb = (
        torch.load(p / "checkpoints" / "last" / "training_state" / "optimizer.pt", weights_only=True)
        for p in (full, part)
    )
    assert all(torch.equal(fa["state"][i]["exp_avg"], fb["state"][i]["exp_avg"]) for i in fa["state"])


def test_resume_refuses_a_changed_batch_size(tiny_dataset, tmp_path):
    import pytest

    from craftvla.errors import CraftVLAError

    run = tmp_path / "run"
    train(_flags(tiny_dataset, run, "--stop_at_step", "1"))
    with pytest.raises(CraftVLAError, match="batch_size=8"):
        train(
            train_config(
                run,
                "--dataset.root",
                str(tiny_dataset),
                "--steps",
                "6",
                "--batch_size",
                "8",
                "--seed",
                "3",
                "--resume",
                "true",
            )
        )
    with pytest.raises(CraftVLAError, match="already holds a run"):
        train(_flags(tiny_dataset, run))
