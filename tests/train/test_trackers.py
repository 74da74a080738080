"""Where metrics go besides metrics.jsonl: TensorBoard through Accelerate's tracker API (every value,
CRaFT's and periodic evaluation's included), log lines without a progress bar, and plots refreshed
while training."""

from __future__ import annotations

import pytest

from craftvla.errors import ConfigError
from craftvla.train.loop import train
from craftvla.train.metrics import read_metrics
from tests.train.conftest import train_config


def _scalars(event_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_receives_every_metric_of_metrics_jsonl(tiny_dataset, tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="craftvla.train"):
        train(
            train_config(
                out,
                "--dataset.root",
                str(tiny_dataset),
                "--steps",
                "4",
                "--batch_size",
                "4",
                "--log.log_freq",
                "1",
                "--checkpoint.save_freq",
                "0",
                "--log.trackers",
                "tensorboard",
                "--craft.enabled",
                "true",
                "--craft.log_freq",
                "1",
                "--eval.freq",
                "2",
                "--eval.tasks",
                "drawer-close-v3",
                "--eval.episodes",
                "1",
            )
        )
    records = read_metrics(out / "metrics.jsonl")
    scalars = _scalars(next((out / "tensorboard").glob("*/")))
    numeric = {
        (k, r["step"]): v
        for r in records
        for k, v in r.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    assert {"craft/lambda", "craft/retention_loss", "eval/mean_success_rate", "loss"} <= {k for k, _ in numeric}
    for (key, step), value in numeric.items():
        assert scalars[key][step] == pytest.approx(value, rel=1e-6, abs=1e-12), (key, step)
    assert "step 3/4  loss" in caplog.text  # --log.progress false (the micro flags): a line per metrics line


def test_an_unknown_tracker_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="log.trackers='mlflow'"):
        train_config(tmp_path, "--log.trackers", "mlflow")


def test_overview_is_refreshed_at_log_lines_and_shows_lambda(tiny_dataset, tmp_path, monkeypatch):
    from craftvla.train import plots

    calls = []
    monkeypatch.setattr(plots, "plot_overview", lambda *args: calls.append(args))
    out = tmp_path / "run"
    train(
        train_config(
            out,
            "--dataset.root",
            str(tiny_dataset),
            "--steps",
            "4",
            "--batch_size",
            "4",
            "--log.log_freq",
            "1",
            "--checkpoint.save_freq",
            "0",
            "--log.plots",
            "true",
            "--log.plot_interval_s",
            "0",
            "--craft.enabled",
            "true",
        )
    )
    assert len(calls) == 3  # steps 1-3; step 4 draws every plot with the checkpoint
    assert (out / "plots" / "overview.png").is_file() and (out / "plots" / "craft_lambda.png").is_file()
    curves = plots.series(read_metrics(out / "metrics.jsonl"))
    assert "craft/lambda" in plots.overview_keys(curves)


def test_a_tracker_without_its_package_is_one_clear_error(tmp_path, monkeypatch):
    import importlib.util

    from craftvla.train import metrics

    real = importlib.util.find_spec
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(
        ConfigError, match=r"log.trackers='wandb': the 'wandb' package is not installed \(pip install wandb\)"
    ):
        train(train_config(tmp_path / "run", "--log.trackers", "wandb", "--steps", "1", "--batch_size", "2"))
