"""Evaluation counts success correctly: per-episode flags, the last allowed step, lockstep envs."""

import json

import numpy as np

from craftvla.keys import STATE_KEY
from craftvla.sim.evaluate import evaluate
from craftvla.sim.metaworld import EVAL_STREAM
from craftvla.sim.policies import ExpertPolicy
from craftvla.sim.rollout import RolloutSpec, run_episodes

TASK = "drawer-close-v3"


class StillPolicy:
    """Zero actions: the arm never moves, so an open drawer stays open."""

    chunk_size, cameras, image_size = 4, [], None

    def reset(self):
        pass

    def predict_chunk(self, observations):
        return np.zeros((len(observations), self.chunk_size, 4), np.float32)


def _expert_lengths(episodes, max_steps=200):
    spec = RolloutSpec(seed=0, stream=EVAL_STREAM, max_steps=max_steps)
    runs = sorted(run_episodes(ExpertPolicy(), TASK, episodes, spec), key=lambda e: e.index)
    assert all(e.success for e in runs)  # the expert solves each position, at different steps
    return [e.length for e in runs]


def test_results_equal_episode_flags_and_the_last_allowed_step_counts(tmp_path):
    lengths = _expert_lengths(5)
    cut = sorted(lengths)[2]  # the median episode succeeds exactly on its last allowed step
    results = evaluate(
        ExpertPolicy(), TASK, episodes=5, seed=0, max_steps=cut, out_dir=tmp_path, num_videos=0, progress=False
    )
    rows = json.loads((tmp_path / "episodes.json").read_text())
    flags = [r["success"] for r in sorted(rows, key=lambda r: r["episode"])]
    assert flags == [n <= cut for n in lengths]  # success at step == max_steps counts; one more does not
    assert 0 < sum(flags) < 5
    row = json.loads((tmp_path / "results.json").read_text())["tasks"][TASK]
    assert row == results["tasks"][TASK]
    assert row["success_rate"] == sum(flags) / 5
    assert row["mean_length"] == np.mean([min(n, cut) for n in lengths])


def test_a_policy_that_never_succeeds_scores_zero(tmp_path):
    results = evaluate(
        StillPolicy(), TASK, episodes=3, seed=0, max_steps=30, out_dir=tmp_path, num_videos=0, progress=False
    )
    assert results["tasks"][TASK] == {
        "success_rate": 0.0,
        "episodes": 3,
        "mean_length": 30.0,
        "instruction": "close the drawer",
        "seen_in_training": None,
    }
    assert results["mean_success_rate"] == 0.0
    rows = json.loads((tmp_path / "episodes.json").read_text())
    assert [(r["success"], r["length"]) for r in rows] == [(False, 30)] * 3


def test_lockstep_envs_give_the_same_episodes_state_by_state():
    """A deterministic policy: 1 env and 3 envs in lockstep (the third env runs two episodes)."""
    runs = {}
    for num_envs in (1, 3):
        spec = RolloutSpec(seed=4, stream=EVAL_STREAM, max_steps=60, num_envs=num_envs, record=True)
        runs[num_envs] = {e.index: e for e in run_episodes(ExpertPolicy(), TASK, 4, spec)}
    assert sorted(runs[1]) == sorted(runs[3]) == [0, 1, 2, 3]
    for i in range(4):
        one, three = runs[1][i], runs[3][i]
        assert (one.seed, one.success, one.length) == (three.seed, three.success, three.length)
        np.testing.assert_array_equal(
            np.stack([f[STATE_KEY] for f in one.frames]), np.stack([f[STATE_KEY] for f in three.frames])
        )
        np.testing.assert_array_equal(
            np.stack([f["action"] for f in one.frames]), np.stack([f["action"] for f in three.frames])
        )
