"""The continual-learning figures of a task sequence, and what a stage's training log says.

The accuracy matrix R (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory"): R[k, j] is the success
on task j after stage k; row 0 is the start policy. Its tasks count as learned at stage 0, task k of
the sequence at stage k. From it:
- average accuracy after stage k: the mean of row k over the tasks seen by then,
- backward transfer: the mean over tasks learned before the last stage T of R[T, j] - R[l(j), j]
  (l(j): the stage that learned j); negative = forgetting.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def accuracy_matrix(start: dict[str, float], records: list[dict], columns: list[str]) -> np.ndarray:
    """(T+1, J) success: row 0 the start policy's (`start`: task -> success), row k stage k's record;
    NaN where a task was not evaluated."""
    rows = [start, *(r["success"] for r in sorted(records, key=lambda r: r["stage"]))]
    return np.array([[row.get(task, math.nan) for task in columns] for row in rows], dtype=np.float64)


def learned_at(columns: list[str], sequence: list[str]) -> list[int]:
    """The stage that learns each column's task: 0 for the start policy's tasks, k for task k."""
    return [sequence.index(task) + 1 if task in sequence else 0 for task in columns]


def average_accuracy(matrix: np.ndarray, learned: list[int]) -> np.ndarray:
    """(T+1,) mean success after each stage over the tasks learned by then (NaN where none)."""
    stages = np.arange(len(matrix))[:, None]
    seen = np.array(learned)[None, :] <= stages  # (T+1, J)
    values = np.where(seen, matrix, np.nan)
    return np.array([np.nanmean(row) if np.isfinite(row).any() else math.nan for row in values])


def kept_accuracy(matrix: np.ndarray, learned: list[int]) -> np.ndarray:
    """(T,) mean success after each stage k >= 1 on the tasks learned before it (what stage k had to keep)."""
    return np.array(
        [np.nanmean(matrix[k, [j for j, at in enumerate(learned) if at < k]]) for k in range(1, len(matrix))]
    )


def backward_transfer(matrix: np.ndarray, learned: list[int], columns: list[int] | None = None) -> float:
    """Mean of R[T, j] - R[l(j), j] over tasks learned before the last stage T (optionally only over
    the column indices `columns`); NaN when there are none."""
    last = len(matrix) - 1
    picked = [j for j in (columns if columns is not None else range(len(learned))) if learned[j] < last]
    deltas = [matrix[last, j] - matrix[learned[j], j] for j in picked]
    deltas = [d for d in deltas if math.isfinite(d)]
    return float(np.mean(deltas)) if deltas else math.nan


def run_summary(run_dir: Path) -> dict:
    """From a training run's metrics.jsonl and train_config.yaml: its wall-clock and, when CRaFT's dual
    variable ran, whether the budget bound: the share of logged steps with L_ret <= epsilon, lambda at
    the end and at its largest, and L_ret at the end (averaged over craft.log_freq steps)."""
    import yaml

    from craftvla.train.metrics import read_metrics

    rows = read_metrics(run_dir / "metrics.jsonl")
    out = {"train_s": max(r.get("elapsed_s", 0.0) for r in rows)}
    ret = [r["craft/retention_loss"] for r in rows if "craft/retention_loss" in r]
    craft = yaml.safe_load((run_dir / "train_config.yaml").read_text())["craft"]
    if ret and craft["mode"] in ("craft", "dual_only"):
        lam = [r["craft/lambda"] for r in rows if "craft/lambda" in r]
        eps = craft["retention_budget"]
        out.update(
            budget=eps,
            within_budget=sum(x <= eps for x in ret) / len(ret),
            final_retention_loss=ret[-1],
            final_lambda=lam[-1],
            max_lambda=max(lam),
        )
    return out


def matrix_markdown(matrix: np.ndarray, columns: list[str]) -> str:
    """The matrix as a markdown table: a row per stage (0 = the start), '-' where not evaluated."""
    head = "| after stage | " + " | ".join(c.removesuffix("-v3") for c in columns) + " |"
    lines = [head, "|---" * (len(columns) + 1) + "|"]
    for k, row in enumerate(matrix):
        cells = [f"{v:.2f}" if math.isfinite(v) else "-" for v in row]
        lines.append(f"| {k if k else '0 (start)'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
