"""`eval`: the expert row succeeds, results.json has the promised form, videos decode."""

import json
from pathlib import Path

import av
import numpy as np
import pytest

from craftvla.errors import CraftVLAError
from craftvla.sim.evaluate import evaluate, main
from craftvla.sim.policies import CheckpointPolicy, ExpertPolicy, RandomPolicy

TASK = "drawer-close-v3"


def _check_format(results, tasks, episodes):
    assert set(results) == {"tasks", "mean_success_rate", "seen", "unseen", "policy", "training_tasks", "settings"}
    assert list(results["tasks"]) == tasks
    for row in results["tasks"].values():
        assert set(row) == {"success_rate", "episodes", "mean_length", "instruction", "seen_in_training"}
        assert 0.0 <= row["success_rate"] <= 1.0 and row["episodes"] == episodes
        assert isinstance(row["mean_length"], float)
    rates = [r["success_rate"] for r in results["tasks"].values()]
    assert results["mean_success_rate"] == pytest.approx(np.mean(rates))


def test_expert_row_succeeds_and_writes_results_and_videos(tmp_path):
    results = evaluate(ExpertPolicy(), TASK, episodes=5, seed=0, out_dir=tmp_path, num_videos=1, progress=False)
    _check_format(results, [TASK], 5)
    assert results["tasks"][TASK]["success_rate"] >= 0.8
    assert json.loads((tmp_path / "results.json").read_text()) == results
    episodes = json.loads((tmp_path / "episodes.json").read_text())
    assert len({e["seed"] for e in episodes}) == 5
    assert np.mean([e["length"] for e in episodes]) == pytest.approx(results["tasks"][TASK]["mean_length"])
    (video,) = (tmp_path / "videos").glob("*.mp4")
    with av.open(str(video)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == episodes[0]["length"] + 1  # reset + each step: one frame per 12.5 ms control step
    assert frames[0].shape == (128, 128, 3)  # videos at >= 128 px, though the expert's row renders at 64
    with av.open(str(video)) as container:
        assert container.streams.video[0].average_rate == 80  # the control rate: real time
    with pytest.raises(CraftVLAError, match="already exists"):
        evaluate(ExpertPolicy(), TASK, episodes=1, out_dir=tmp_path, progress=False)


def test_random_row_runs_and_is_deterministic():
    kwargs = dict(episodes=2, seed=3, max_steps=25, num_envs=2, progress=False)
    first = evaluate(RandomPolicy(seed=3), ["button-press-topdown-v3", TASK], **kwargs)
    _check_format(first, ["button-press-topdown-v3", TASK], 2)
    assert first == evaluate(RandomPolicy(seed=3), ["button-press-topdown-v3", TASK], **kwargs)


def test_checkpoint_policy_runs_end_to_end(tmp_path):
    from craftvla.config import VLAConfig
    from craftvla.model.policy import VLAPolicy

    cfg = VLAConfig.preset("tiny")
    model = VLAPolicy(cfg)
    ones, zeros = np.ones(4, np.float32), np.zeros(4, np.float32)
    model.processor.set_stats(
        {k: {"mean": zeros, "std": ones * 4.0, "min": -ones, "max": ones} for k in ("observation.state", "action")},
        "test",
    )
    model.save_pretrained(tmp_path / "ckpt")
    policy = CheckpointPolicy.from_pretrained(tmp_path / "ckpt")
    assert policy.cameras == ["corner"] and policy.chunk_size == cfg.chunk_size
    observations = [_fake_obs(cfg.vision.image_size)] * 2
    chunk = policy.predict_chunk(observations)
    assert chunk.shape == (2, cfg.chunk_size, 4)
    policy.policy.processor.config.action_clip = "none"  # the same forward, un-clipped
    unclipped = policy.predict_chunk(observations)
    assert (np.abs(unclipped) > 1.0).any() and (np.abs(unclipped) < 1.0).any()  # std 4: both kinds
    np.testing.assert_allclose(chunk, np.clip(unclipped, -1.0, 1.0))  # clipped to the stats' min/max
    out = tmp_path / "eval"
    assert (
        main(
            [
                "--checkpoint",
                str(tmp_path / "ckpt"),
                "--tasks",
                TASK,
                "--episodes",
                "2",
                "--max_steps",
                "12",
                "--num_envs",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    _check_format(json.loads((out / "results.json").read_text()), [TASK], 2)


def _fake_obs(size):
    rng = np.random.default_rng(0)
    return {
        "observation.images.corner": rng.integers(0, 255, (size, size, 3), dtype=np.uint8),
        "observation.state": np.array([0.0, 0.6, 0.2, 1.0], np.float32),
        "task": "close the drawer",
    }


def test_defaults_compose_with_train(tmp_path, monkeypatch):
    """`craftvla eval` alone reads what `craftvla train` writes by default, and writes to runs/eval/."""
    from craftvla.config import VLAConfig
    from craftvla.model.policy import VLAPolicy

    monkeypatch.chdir(tmp_path)
    cfg = VLAConfig.preset("tiny")
    cfg.vision.depth, cfg.llm.num_layers = 1, 2
    model = VLAPolicy(cfg)
    ones, zeros = np.ones(4, np.float32), np.zeros(4, np.float32)
    model.processor.set_stats(
        {k: {"mean": zeros, "std": ones, "min": -ones, "max": ones} for k in ("observation.state", "action")}, "test"
    )
    model.save_pretrained(tmp_path / "runs/train/checkpoints/last")
    assert main(["--tasks", TASK, "--episodes", "1", "--max_steps", "5", "--num_envs", "1", "--num_videos", "0"]) == 0
    assert (tmp_path / "runs/eval/runs-train-last/drawer-close/results.json").is_file()
    assert not (tmp_path / "runs/train/checkpoints/last/eval").exists()  # never inside the checkpoint


def test_an_existing_result_is_refused_before_anything_loads(tmp_path, capsys):
    from craftvla.cli import main as cli

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text("{}")
    argv = [
        "eval",
        "--checkpoint",
        str(tmp_path / "no-such-checkpoint"),
        "--tasks",
        TASK,
        "--out",
        str(tmp_path / "out"),
    ]
    assert cli(argv) == 1  # the results are found before the (missing) checkpoint is opened
    assert "results.json: already exists; choose another --out" in capsys.readouterr().err


def test_out_inside_the_checkpoint_is_refused(tmp_path):
    from craftvla.errors import ConfigError
    from craftvla.sim.evaluate import EvalConfig

    with pytest.raises(ConfigError, match="inside the checkpoint"):
        EvalConfig(checkpoint=str(tmp_path / "ckpt"), out=str(tmp_path / "ckpt" / "eval"), tasks=TASK)
    many = EvalConfig(checkpoint="runs/x/checkpoints/000300", tasks="drawer-close-v3,door-open-v3,reach-v3,push-v3")
    assert many.out.startswith("runs/eval/runs-x-000300/4-tasks-")


def test_results_record_the_policy_and_which_tasks_it_was_trained_on(tmp_path):
    """The shipped generalist knows its five training instructions: drawer-close is seen, window-open
    is not, and the two means are kept apart."""
    from craftvla.cli import main as cli

    out = tmp_path / "eval"
    generalist = Path(__file__).resolve().parents[2] / "assets" / "generalist" / "checkpoint"
    assert (
        cli(
            [
                "eval",
                "--checkpoint",
                str(generalist),
                "--tasks",
                f"{TASK},window-open-v3",
                "--episodes",
                "1",
                "--max_steps",
                "10",
                "--num_envs",
                "1",
                "--num_videos",
                "0",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    _check_format(results, [TASK, "window-open-v3"], 1)
    rows = results["tasks"]
    assert (rows[TASK]["instruction"], rows[TASK]["seen_in_training"]) == ("close the drawer", True)
    assert (rows["window-open-v3"]["instruction"], rows["window-open-v3"]["seen_in_training"]) == (
        "open the window",
        False,
    )
    assert results["seen"] == {"tasks": [TASK], "mean_success_rate": rows[TASK]["success_rate"]}
    assert results["unseen"]["tasks"] == ["window-open-v3"]
    assert results["policy"]["checkpoint"].endswith("assets/generalist/checkpoint")
    assert len(results["training_tasks"]) == 5 and results["settings"]["max_steps"] == 10
