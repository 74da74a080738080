"""Accuracy matrices as heatmaps: one panel per policy, rows = after stage 0 (the start) .. T."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def matrices_plot(matrices: dict[str, np.ndarray], columns: list[str], path: Path, per_row: int = 4) -> Path:
    """matrices: panel title -> (T+1, J) success (NaN = not evaluated); columns: the J task names."""
    from craftvla.train.plots import pyplot, save_figure

    plt = pyplot()
    cols = min(per_row, len(matrices))
    rows = math.ceil(len(matrices) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(0.5 * len(columns) * cols + 1, 2.6 * rows), dpi=100, squeeze=False)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#eeeeee")  # grey: not evaluated (a task not yet seen)
    for ax, (title, matrix) in zip(axes.flat, matrices.items()):
        ax.imshow(np.ma.masked_invalid(matrix), vmin=0.0, vmax=1.0, cmap=cmap, aspect="auto")
        for (i, j), v in np.ndenumerate(matrix):
            if math.isfinite(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 else "k")
        ax.set_title(title, fontsize=8)
        ax.set_xticks(range(len(columns)), [c.removesuffix("-v3") for c in columns], rotation=60, fontsize=6)
        ax.set_yticks(range(len(matrix)), ["start", *(f"after {k}" for k in range(1, len(matrix)))], fontsize=6)
    for ax in list(axes.flat)[len(matrices) :]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)
