"""`--eval.freq`: closed-loop evaluation during training logs success rates and changes nothing
about the training itself (it restores every RNG it touches)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from craftvla.train.loop import train
from craftvla.train.metrics import read_metrics
from tests.train.conftest import train_config


def rng_loss(context, batch):
    """An auxiliary loss drawn from the torch, NumPy and Python RNGs: if evaluation advanced any of
    them, the losses after it would differ."""
    draw = float(np.random.random()) + random.random()
    return 0.05 * (torch.rand(()) + draw), {"rng_draw": draw}


def _run(data, out, *extra):
    cfg = train_config(
        out,
        "--dataset.root",
        str(data),
        "--steps",
        "4",
        "--batch_size",
        "4",
        "--log.log_freq",
        "1",
        "--checkpoint.save_freq",
        "0",
        "--seed",
        "5",
        *extra,
    )
    train(cfg, aux_losses={"rng": rng_loss})
    return read_metrics(out / "metrics.jsonl")


@pytest.mark.parametrize("head", ["l1_bridge", "flow_matching"])  # flow sampling draws torch noise
def test_periodic_eval_logs_success_and_leaves_training_unchanged(tiny_dataset, tmp_path, head):
    plain = _run(tiny_dataset, tmp_path / "plain", "--policy.head.type", head)
    evaluated = _run(
        tiny_dataset,
        tmp_path / "eval",
        "--policy.head.type",
        head,
        "--eval.freq",
        "2",
        "--eval.tasks",
        "drawer-close-v3",
        "--eval.episodes",
        "1",
    )
    train_rows = [r for r in evaluated if "loss" in r]
    eval_rows = [r for r in evaluated if "eval/mean_success_rate" in r]
    assert [r["step"] for r in eval_rows] == [2, 4]
    for row in eval_rows:
        assert row["eval/drawer-close-v3"] == row["eval/mean_success_rate"] in (0.0, 1.0)
        step_dir = tmp_path / "eval" / "eval" / f"{row['step']:06d}"
        results = json.loads((step_dir / "results.json").read_text())
        assert results["mean_success_rate"] == row["eval/mean_success_rate"]
    assert [r["step"] for r in train_rows] == [r["step"] for r in plain] == [1, 2, 3, 4]
    for a, b in zip(plain, train_rows):
        keys = set(a) - {"elapsed_s", "samples_per_s"}
        assert keys == set(b) - {"elapsed_s", "samples_per_s"} and {"loss", "aux/rng", "grad_norm"} <= keys
        for key in keys:
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
