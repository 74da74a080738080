"""Continual fine-tuning: tasks learned one stage after another (sequence.py), and the figures that
measure what each stage kept (metrics.py: accuracy matrix, average accuracy, backward transfer)."""

from craftvla.continual.metrics import (
    accuracy_matrix,
    average_accuracy,
    backward_transfer,
    kept_accuracy,
    learned_at,
    run_summary,
)
from craftvla.continual.sequence import Method, Source, Stage, plan_stages, run_sequence, run_stage

__all__ = [
    "Method",
    "Source",
    "Stage",
    "accuracy_matrix",
    "average_accuracy",
    "backward_transfer",
    "kept_accuracy",
    "learned_at",
    "plan_stages",
    "run_sequence",
    "run_stage",
    "run_summary",
]
