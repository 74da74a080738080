"""CRaFT through `craftvla train`: the craft/* metrics, the dual rule across a resume, the flags."""

from __future__ import annotations

import shutil

import pytest
import torch

from craftvla.craft.functional import dual_update
from craftvla.errors import ConfigError
from craftvla.train.loop import train
from craftvla.train.metrics import read_metrics
from tests.train.conftest import train_config

CRAFT = [
    "--craft.enabled",
    "true",
    "--craft.log_freq",
    "1",
    "--craft.dual_lr",
    "2.0",
    "--craft.retention_budget",
    "0.001",
    "--craft.retention_weight",
    "0.5",
]


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
        "--optim.lr",
        "3e-3",
        "--schedule.warmup_steps",
        "0",
        "--seed",
        "1",
        *CRAFT,
        *extra,
    )


def test_lambda_follows_the_dual_rule_from_logged_losses_and_survives_resume(tiny_dataset, tmp_path):
    full = tmp_path / "full"
    train(_flags(tiny_dataset, full))
    part = tmp_path / "part"
    train(_flags(tiny_dataset, part, "--stop_at_step", "4"))
    shutil.rmtree(part / "checkpoints" / "000004")  # as if killed before step 4's checkpoint
    (part / "checkpoints" / "last").unlink()
    (part / "checkpoints" / "last").symlink_to("000003")
    train(_flags(tiny_dataset, part, "--resume", "true"))

    records = read_metrics(full / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    lam = 0.5
    for r in records:  # lambda_t = max(0, lambda_{t-1} + eta * (L_ret_t - eps)), from the logged L_ret
        lam = dual_update(lam, r["craft/retention_loss"], 0.001, 2.0)
        assert r["craft/lambda"] == pytest.approx(lam, rel=1e-5, abs=1e-7)
        assert {"craft/conflict", "craft/cos", "craft/beta"} <= set(r)
    assert records[0]["craft/retention_loss"] == pytest.approx(0.0, abs=1e-12)  # step 1: weights are the anchors
    assert records[-1]["craft/retention_loss"] > 1e-6  # ... then the features drift and lambda responds
    assert len({round(r["craft/lambda"], 7) for r in records}) == 6

    resumed = read_metrics(part / "metrics.jsonl")
    for a, b in zip(records, resumed, strict=True):
        for key in ("loss", "craft/retention_loss", "craft/lambda", "craft/beta", "grad_norm"):
            assert a[key] == b[key], (a["step"], key)
    saved = torch.load(full / "checkpoints" / "last" / "training_state" / "plugins.pt", weights_only=True)
    assert saved["grad_plugin"]["lambda"] == pytest.approx(records[-1]["craft/lambda"])


def test_resume_with_craft_switched_off_is_refused(tiny_dataset, tmp_path):
    from craftvla.errors import CraftVLAError

    run = tmp_path / "run"
    train(_flags(tiny_dataset, run, "--stop_at_step", "1", "--checkpoint.save_freq", "1"))
    plain = train_config(
        run,
        "--dataset.root",
        str(tiny_dataset),
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
        "--optim.lr",
        "3e-3",
        "--schedule.warmup_steps",
        "0",
        "--seed",
        "1",
        "--resume",
        "true",
    )
    with pytest.raises(CraftVLAError, match="grad_plugin"):  # the saved lambda would be dropped silently
        train(plain)


@pytest.mark.parametrize(
    "flags, field",
    [
        (["--craft.mode", "ewc"], "craft.mode"),
        (["--craft.enabled", "true", "--accel.strategy", "fsdp"], "accel.strategy"),
        (["--craft.anchor_source", "cache"], "craft.anchor_cache"),
        (["--craft.retention_budget", "-1"], "craft.retention_budget"),
    ],
)
def test_bad_craft_flags_name_the_field(tmp_path, flags, field):
    with pytest.raises(ConfigError, match=field):
        train_config(tmp_path / "run", *flags)


@pytest.mark.parametrize(
    "log_flags, craft_steps, all_steps",
    [
        ([], [3, 6, 7], [3, 6, 7]),  # default: the run's log frequency, and the run's last step (7)
        (
            ["--craft.log_freq", "1"],
            [1, 2, 3, 4, 5, 6, 7],
            [1, 2, 3, 4, 5, 6, 7],
        ),  # finer than the run's: lines at each
        (["--craft.log_freq", "5"], [5, 7], [3, 5, 6, 7]),  # coarser: craft/* only every 5 (and at the end)
    ],
)
def test_craft_metrics_follow_one_logging_knob(tmp_path, log_flags, craft_steps, all_steps):
    run = tmp_path / "run"
    train(
        train_config(
            run,
            "--steps",
            "7",
            "--batch_size",
            "2",
            "--log.log_freq",
            "3",
            "--checkpoint.save_freq",
            "0",
            "--craft.enabled",
            "true",
            *log_flags,
        )
    )
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == all_steps
    assert [r["step"] for r in records if "craft/lambda" in r] == craft_steps


def test_run_shorter_than_the_interval_still_logs_craft(tmp_path):
    run = tmp_path / "run"
    train(train_config(run, "--steps", "4", "--batch_size", "2", "--craft.enabled", "true"))  # log_freq 10
    (record,) = read_metrics(run / "metrics.jsonl")
    assert record["step"] == 4 and {"craft/retention_loss", "craft/lambda", "loss"} <= set(record)


def test_anchor_dataset_with_combined_targets_resumes_exactly(tiny_dataset, tmp_path):
    """Online anchors from another dataset, two targets: the anchor stream continues across a
    resume (same losses as the uninterrupted run), the measured scales are saved and logged."""
    from tests.train.conftest import write_tiny_dataset

    anchors = write_tiny_dataset(tmp_path / "old", episodes=2, length=9)
    extra = (
        "--craft.anchor_dataset",
        str(anchors),
        "--craft.targets",
        "pooled,actions",
        "--craft.anchor_batch_size",
        "3",
        "--craft.scale_samples",
        "12",
    )
    full, part = tmp_path / "full", tmp_path / "part"
    train(_flags(tiny_dataset, full, *extra))
    train(_flags(tiny_dataset, part, *extra, "--stop_at_step", "3"))
    train(_flags(tiny_dataset, part, *extra, "--resume", "true"))
    records, resumed = read_metrics(full / "metrics.jsonl"), read_metrics(part / "metrics.jsonl")
    for a, b in zip(records, resumed, strict=True):
        for key in ("loss", "craft/retention_loss", "craft/ret/pooled", "craft/ret/actions", "craft/lambda"):
            assert a[key] == b[key], (a["step"], key)
    for r in records:
        assert r["craft/retention_loss"] == pytest.approx((r["craft/ret/pooled"] + r["craft/ret/actions"]) / 2)
    assert records[-1]["craft/ret/actions"] > 0
    saved = torch.load(full / "checkpoints" / "last" / "training_state" / "plugins.pt", weights_only=True)
    assert set(saved["grad_plugin"]["scales"]) == {"pooled", "actions"}
    assert all(v > 0 for v in saved["grad_plugin"]["scales"].values())
