"""Continual fine-tuning (craftvla.continual): the figures against hand-computed ones, the stage plan,
and a two-stage sequence from the shipped generalist at a reduced size (chaining, anchor data, resume)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import yaml

os.environ.setdefault("MUJOCO_GL", "egl")

from craftvla.continual import (  # noqa: E402
    Method,
    Source,
    accuracy_matrix,
    average_accuracy,
    backward_transfer,
    learned_at,
    plan_stages,
    run_sequence,
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


def test_two_stages_from_the_generalist_resume_and_retrain_a_lost_checkpoint(tmp_path, capsys):
    """Stage 2 starts from stage 1's weights and anchors on the start data + stage 1's; a rerun trains
    nothing; with stage 1's checkpoint gone, stage 2 retrains it first, to the same weights."""
    from craftvla.demo import SHIPPED
    from craftvla.sim.collect import CollectConfig, collect

    roots = {}
    for name, task in (("start", "drawer-close-v3"), ("t1", "window-open-v3"), ("t2", "drawer-open-v3")):
        roots[name] = tmp_path / name
        collect(CollectConfig(out=str(roots[name]), tasks=task, episodes=1, seed=5))
    start = Source(roots["start"], ("drawer-close-v3",))
    data = {"window-open-v3": roots["t1"], "drawer-open-v3": roots["t2"]}
    stages = plan_stages(list(data), SHIPPED, start, data, tmp_path / "seq")
    method = Method("craft", ("--craft.enabled", "true", "--craft.log_freq", "1"), anchors=True)
    train = ["--steps", "2", "--batch_size", "4", "--dataset.num_workers", "0", "--log.plots", "false"]

    records = run_sequence(stages, method, 0, train, episodes=1)
    assert [r["stage"] for r in records] == [1, 2]
    assert set(records[1]["success"]) == {"drawer-close-v3", "window-open-v3", "drawer-open-v3"}
    assert all(v in (0.0, 1.0) for r in records for v in r["success"].values())
    cfg2 = yaml.safe_load((stages[1].dir / "run" / "train_config.yaml").read_text())
    assert cfg2["init_from"] == str(stages[0].checkpoint)
    assert cfg2["craft"]["anchor_dataset"] == f"{roots['start']},{roots['t1']}"
    assert records[1]["start"]["sha256"] == records[0]["sha256"] and records[1]["start"]["matches_record"]
    for r in records:  # CRaFT ran every step with a budget: the summary says how it bound
        assert r["budget"] == 0.1 and 0.0 <= r["within_budget"] <= 1.0 and r["final_lambda"] >= 0.0

    capsys.readouterr()
    assert run_sequence(stages, method, 0, train, episodes=1) == records  # finished: read back
    assert "fine-tuning" not in capsys.readouterr().out

    result = json.loads(stages[1].result.read_text())
    stages[1].result.unlink()
    import shutil

    shutil.rmtree(stages[0].dir / "run")  # a fresh machine: stage 1's record kept, its weights gone
    shutil.rmtree(stages[1].dir / "run")
    shutil.rmtree(stages[1].dir / "eval")
    again = run_sequence(stages, method, 0, train, episodes=1)
    assert again[1]["start"]["retrained"] is True
    assert again[1]["start"]["matches_record"] is True  # CPU training is deterministic: the same weights
    assert again[1]["sha256"] == result["sha256"]
