"""`accelerate launch` of `craftvla train` on 2 processes: the same run as 1 process on the same
global batch (metrics and checkpoint), and it resumes on 2 ranks. CRaFT is on, so its dual
variable and all-reduced surgery travel through the launcher and the checkpoint too."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from craftvla.train.loop import train
from craftvla.train.metrics import read_metrics
from tests.launch import accelerate_launch, run_child
from tests.train.conftest import MICRO_ARGS, train_config

# batch 8 = 2 processes x 1 micro-batch of 4 = 1 process x 2 accumulated micro-batches of 4:
# the same micro-batches (StepSampler), so the same padded-step averaging in the loss.
RUN = [
    "--steps",
    "4",
    "--batch_size",
    "8",
    "--log.log_freq",
    "1",
    "--checkpoint.save_freq",
    "2",
    "--checkpoint.keep_last",
    "3",
    "--seed",
    "3",
    "--craft.enabled",
    "true",
    "--craft.log_freq",
    "1",
    "--craft.dual_lr",
    "1.0",
    "--optim.grad_clip_norm",
    "2.0",
]
KEYS = ("loss", "l1_loss", "grad_norm", "lr", "craft/lambda", "craft/retention_loss")


def _launch(data, out, *extra):
    cmd = accelerate_launch(
        2, "-m", "craftvla", "train", *MICRO_ARGS, "--dataset.root", str(data), "--output_dir", str(out), *RUN, *extra
    )
    return run_child(cmd)


def _same_metrics(a, b, rel=1e-5):
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for key in KEYS:
            assert rb[key] == pytest.approx(ra[key], rel=rel, abs=1e-7), (ra["step"], key, ra[key], rb[key])


def _same_weights(a, b, atol):
    wa, wb = (load_file(p / "checkpoints" / "last" / "model.safetensors") for p in (a, b))
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= atol, worst


def test_two_processes_equal_one_and_resume(tiny_dataset, tmp_path):
    one = tmp_path / "one"
    train(train_config(one, "--dataset.root", str(tiny_dataset), *RUN, "--grad_accum_steps", "2"))
    two = tmp_path / "two"
    done = _launch(tiny_dataset, two)
    assert "processes: 2" in done.stderr + done.stdout
    state = json.loads((two / "checkpoints" / "last" / "training_state" / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 4
    assert {p.name for p in (two / "checkpoints" / "last" / "training_state").glob("rng_state_*.pt")} == {
        "rng_state_0.pt",
        "rng_state_1.pt",
    }
    a, b = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert b[0]["grad_norm"] > 2.0  # clipping bound in the first step at least
    assert b[-1]["craft/lambda"] != b[0]["craft/lambda"]  # the dual variable moved
    _same_metrics(a, b)
    _same_weights(one, two, atol=1e-5)

    part = tmp_path / "part"  # the 2-rank run, killed after its step-2 checkpoint
    shutil.copytree(two, part, symlinks=True)
    (part / "checkpoints" / "last").unlink()
    shutil.rmtree(part / "checkpoints" / "000004")
    (part / "checkpoints" / "last").symlink_to("000002")
    _launch(tiny_dataset, part, "--resume", "true")
    _same_metrics(b, read_metrics(part / "metrics.jsonl"), rel=1e-6)
    _same_weights(two, part, atol=1e-6)
    fa, fb = (
        torch.load(p / "checkpoints" / "last" / "training_state" / "optimizer.pt", weights_only=True)
        for p in (two, part)
    )
    assert all(torch.allclose(fa["state"][i]["exp_avg"], fb["state"][i]["exp_avg"], atol=1e-7) for i in fa["state"])


def test_plain_accelerate_launch_on_cpu_runs_one_process(tiny_dataset, tmp_path):
    """What the README warns about: without --multi_gpu, Accelerate's launcher starts a single
    process on a CPU-only machine; the start-up line makes that visible."""
    if torch.cuda.is_available():
        pytest.skip("with GPUs, plain --num_processes 2 does start two processes")
    out = tmp_path / "plain"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "craftvla",
        "train",
        *MICRO_ARGS,
        "--dataset.root",
        str(tiny_dataset),
        "--output_dir",
        str(out),
        "--steps",
        "1",
        "--batch_size",
        "4",
    ]
    done = run_child(cmd)
    assert "processes: 1" in done.stderr + done.stdout
