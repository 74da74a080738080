"""PNG training curves from a run's metrics.jsonl (matplotlib, headless Agg backend)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from craftvla.files import atomic_path
from craftvla.train.metrics import read_metrics

# Curves drawn on a log y-axis (losses and norms span decades over a run).
LOG_SCALE_PREFIXES = ("loss", "l1_loss", "grad_norm")
SKIP_KEYS = ("step",)


def series(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """metric name -> (steps, values), for every numeric key in the records."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for rec in records:
        for key, value in rec.items():
            if key in SKIP_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            steps, values = out.setdefault(key, ([], []))
            steps.append(rec["step"])
            values.append(float(value))
    return out


# overview.png: these curves when present, then the first two periodic-evaluation curves.
OVERVIEW_KEYS = ("loss", "lr", "grad_norm", "samples_per_s", "craft/lambda", "craft/retention_loss")


def pyplot():
    """matplotlib.pyplot on the headless Agg back-end."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(metrics_path: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """One PNG per metric (loss.png, lr.png, craft_lambda.png, ...) plus overview.png; returns the paths."""
    plt = pyplot()
    curves = series(read_metrics(metrics_path))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for key, (steps, values) in curves.items():
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        _draw(ax, key, steps, values)
        written.append(save_figure(fig, out / f"{key.replace('/', '_')}.png"))
    overview = _overview(plt, curves, out)
    return written + ([overview] if overview else [])


def plot_overview(metrics_path: str | os.PathLike, out_dir: str | os.PathLike) -> Optional[Path]:
    """overview.png alone (the cheap refresh while training); None while there is nothing to draw."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return _overview(pyplot(), series(read_metrics(metrics_path)), out)


def overview_keys(curves: dict) -> list[str]:
    """The curves overview.png shows, in order."""
    return [k for k in OVERVIEW_KEYS if k in curves] + sorted(k for k in curves if k.startswith("eval/"))[:2]


def _overview(plt, curves: dict, out: Path) -> Optional[Path]:
    keys = overview_keys(curves)
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), dpi=100, squeeze=False)
    for ax, key in zip(axes[0], keys):
        _draw(ax, key, *curves[key])
    return save_figure(fig, out / "overview.png")


def _draw(ax, key: str, steps: list[int], values: list[float]) -> None:
    ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3)
    ax.set_title(key)
    ax.set_xlabel("step")
    if key.startswith(LOG_SCALE_PREFIXES) and min(values) > 0:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)


def save_figure(fig, path: Path) -> Path:
    """Lay out, write atomically (files.atomic_path) and close a figure; returns `path`."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path
