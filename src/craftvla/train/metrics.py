"""Where metrics go: metrics.jsonl, the progress bar or log lines, and the experiment trackers
(TensorBoard, W&B through Accelerate's tracker API), all from the main process only."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import torch

from craftvla.files import write_text_atomic

log = logging.getLogger("craftvla.train")

# --log.trackers name -> the package it needs.
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def tracker_settings(trackers: list[str], run_dir: Path) -> dict[str, Any]:
    """Accelerator(...) keyword arguments for the trackers: log_with and the TensorBoard directory.
    A tracker whose package is missing is one clear error."""
    from craftvla.errors import ConfigError

    for name in trackers:
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise ConfigError(
                f"log.trackers={name!r}: the {TRACKER_PACKAGES[name]!r} package is not installed "
                f"(pip install {TRACKER_PACKAGES[name]})"
            )
    return {"log_with": trackers, "project_dir": str(run_dir / "tensorboard")} if trackers else {}


def start_trackers(accelerator, project: str, run_dir: Path, config: dict[str, Any]) -> None:
    """Open the trackers' run with the flattened training config as its hyper-parameters."""
    values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.init_trackers(
        project, config=values, init_kwargs={"wandb": {"dir": str(run_dir), "name": run_dir.name}}
    )


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines logged after `last_step` (written after the checkpoint a resume starts from).

    Rewritten atomically (files.atomic_path), so a crash here cannot lose the earlier lines.
    """
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    write_text_atomic(path, "".join(line + "\n" for line in keep))


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class MetricsLogger:
    """Averages step metrics over `log_freq` steps, reduces them across ranks, writes JSONL lines.

    Every rank calls `update` (the cross-rank mean is a collective); only the main rank writes
    the file and draws the tqdm bar. Component metrics from the policy and plug-ins (e.g.
    `l1_loss`, `craft/lambda`) are logged under their own keys.
    """

    def __init__(
        self,
        path: Path,
        accelerator,
        log_freq: int,
        start_step: int,
        total_steps: int,
        progress: bool,
        trackers: bool = False,
    ) -> None:
        self.path, self.accelerator, self.log_freq = path, accelerator, log_freq
        self.total_steps, self.trackers = total_steps, trackers
        self.main = accelerator.is_main_process
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)  # per key: plug-ins report some keys only every k steps
        self.count, self.samples, self.t0 = 0, 0, time.perf_counter()
        self.started = self.t0  # elapsed_s: wall time of this invocation (a resumed run restarts it)
        self.bar = None
        if self.main:
            path.parent.mkdir(parents=True, exist_ok=True)
        if self.main and progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True
            )

    def update(
        self, step: int, metrics: dict[str, float], samples: int, extra: Optional[dict] = None, force: bool = False
    ) -> bool:
        """Record one optimizer step; write a line when `step` is a multiple of log_freq or `force`
        (the run's last step; a plug-in's own logging step), and say whether it did. Every rank
        must pass the same `force`."""
        for key, value in metrics.items():  # device tensors stay on the device until a line is written
            self.sums[key] = self.sums[key] + (value.detach() if torch.is_tensor(value) else value)
            self.counts[key] += 1
        self.count += 1
        self.samples += samples
        if self.bar is not None:
            self.bar.update(1)
        if force or step % self.log_freq == 0:
            self._flush(step, extra or {})
            return True
        return False

    def _flush(self, step: int, extra: dict) -> None:
        keys = sorted(self.sums)
        device = self.accelerator.device
        values = (
            torch.stack(
                [
                    torch.as_tensor(self.sums[k] / self.counts[k], dtype=torch.float64, device=device).reshape(())
                    for k in keys
                ]
            )
            if keys
            else torch.zeros(0, dtype=torch.float64)
        )
        values = self.accelerator.reduce(values, reduction="mean") if self.accelerator.num_processes > 1 else values
        seconds = time.perf_counter() - self.t0
        record = {
            "step": step,
            **dict(zip(keys, values.tolist())),
            "samples_per_s": self.samples / seconds,
            "elapsed_s": time.perf_counter() - self.started,
            **extra,
        }
        if torch.cuda.is_available():
            record["mem/peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if self.main:
            self._write(record)
            if self.bar is not None:
                self.bar.set_postfix(
                    loss=f"{record.get('loss', float('nan')):.4f}", samples_s=f"{record['samples_per_s']:.1f}"
                )
            else:
                log.info("step %d/%d  %s", step, self.total_steps, _brief(record))
        self.sums.clear()
        self.counts.clear()
        self.count, self.samples, self.t0 = 0, 0, time.perf_counter()

    def _write(self, record: dict) -> None:
        """One record to metrics.jsonl and to every tracker (at its step)."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.trackers:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def log(self, record: dict) -> None:
        """Write a record as-is (e.g. periodic evaluation results), main rank only."""
        if self.main:
            self._write(record)
            if self.bar is not None:
                self.bar.write(
                    " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
                )

    def close(self, step: int, extra: Optional[dict] = None) -> None:
        """Write what is pending since the last line (a run ending off the log_freq grid)."""
        if self.count:
            self._flush(step, extra or {})
        if self.bar is not None:
            self.bar.close()


def _brief(record: dict) -> str:
    """The headline numbers of a metrics line, for a log without a progress bar."""
    keys = [
        k for k in ("loss", "lr", "grad_norm", "craft/lambda", "craft/retention_loss", "samples_per_s") if k in record
    ]
    return "  ".join(f"{k} {record[k]:.4g}" for k in keys)
