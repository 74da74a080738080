"""Continual fine-tuning (craftvla.continual): the figures against hand-computed ones and the stage plan.
A two-stage sequence from the shipped generalist (chaining, anchor data, resume, a lost checkpoint
retrained) runs end to end in tests/test_demo.py, through `craftvla demo --tasks`."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")

from craftvla.continual import (  # noqa: E402
    Method,
    Source,
    accuracy_matrix,
    average_accuracy,
    backward_transfer,
    kept_accuracy,
    learned_at,
    plan_stages,
)
from craftvla.continual.sequence import replay_weights, stage_flags  # noqa: E402
from craftvla.errors import ConfigError  # noqa: E402

START = Source("data/A", ("a1", "a2"))


def test_figures_against_a_hand_computed_sequence():
    columns = ["a1", "a2", "t1", "t2"]
    start = {"a1": 1.0, "a2": 0.8, "t1": 0.0, "t2": 0.1}
    records = [  # given out of order: the matrix sorts by stage
        {"stage": 2, "success": {"a1": 0.6, "a2": 0.8, "t1": 0.5, "t2": 0.9}},
        {"stage": 1, "success": {"a1": 0.9, "a2": 0.8, "t1": 0.7}},
    ]
    matrix = accuracy_matrix(start, records, columns)
    assert matrix.shape == (3, 4) and math.isnan(matrix[1, 3])
    learned = learned_at(columns, ["t1", "t2"])
    assert learned == [0, 0, 1, 2]
    # row 0: the start tasks only; row 1: + t1; row 2: all four
    np.testing.assert_allclose(average_accuracy(matrix, learned), [0.9, 0.8, 0.7])
    # kept: stage 1 over a1, a2 (0.9 + 0.8) / 2; stage 2 over a1, a2, t1 (0.6 + 0.8 + 0.5) / 3
    np.testing.assert_allclose(kept_accuracy(matrix, learned), [0.85, 1.9 / 3])
    # BWT at stage 2 over a1, a2, t1: (0.6 - 1.0) + (0.8 - 0.8) + (0.5 - 0.7), / 3
    assert backward_transfer(matrix, learned) == pytest.approx(-0.2)
    assert backward_transfer(matrix, learned, columns=[2]) == pytest.approx(-0.2)  # t1 alone
    assert backward_transfer(matrix[:1], learned) != backward_transfer(matrix[:1], learned)  # no stage: NaN


def test_stages_chain_and_carry_the_old_data_forward(tmp_path):
    data = {"t1": tmp_path / "d1", "t2": tmp_path / "d2", "t3": tmp_path / "d3"}
    stages = plan_stages(["t1", "t2", "t3"], tmp_path / "gen", START, data, tmp_path / "seq")
    assert [s.start for s in stages] == [tmp_path / "gen", stages[0].checkpoint, stages[1].checkpoint]
    assert [s.old_tasks for s in stages] == [("a1", "a2"), ("a1", "a2", "t1"), ("a1", "a2", "t1", "t2")]
    assert stages[2].seen == ("a1", "a2", "t1", "t2", "t3")
    assert [s.root for s in stages[2].old] == [START.root, data["t1"], data["t2"]]
    # replay 10 %: 0.1 split over 4 old tasks, the start's source holding two of them
    np.testing.assert_allclose(replay_weights(stages[2], 0.1), [0.9, 0.05, 0.025, 0.025])
    flags = stage_flags(stages[2], Method("r", replay=0.1), 3, ["--steps", "5"])
    assert flags[flags.index("--dataset.roots") + 1] == ",".join(map(str, [data["t3"], START.root, *data.values()][:4]))
    assert flags[flags.index("--init_from") + 1] == str(stages[1].checkpoint)
    assert "--craft.anchor_dataset" not in flags and flags[flags.index("--seed") + 1] == "3"
    anchored = stage_flags(stages[1], Method("c", ("--craft.enabled", "true"), anchors=True), 0, [])
    assert anchored[anchored.index("--craft.anchor_dataset") + 1] == f"{START.root},{data['t1']}"
    assert anchored[anchored.index("--dataset.root") + 1] == str(data["t2"])


@pytest.mark.parametrize(
    "tasks, data, message",
    [
        ([], {}, "at least one task"),
        (["t1", "t1"], {"t1": "x"}, "must be new"),
        (["a1"], {"a1": "x"}, "must be new"),
        (["t1"], {}, "no demonstrations"),
    ],
)
def test_a_bad_sequence_is_refused(tmp_path, tasks, data, message):
    with pytest.raises(ConfigError, match=message):
        plan_stages(tasks, tmp_path, START, data, tmp_path)


def test_method_is_validated():
    with pytest.raises(ConfigError, match="replay"):
        Method("r", replay=1.0)
    with pytest.raises(ConfigError, match="name"):
        Method("a/b")
