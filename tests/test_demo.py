"""`craftvla demo` at a reduced size: the shipped generalist, both fine-tunings, the report."""

from __future__ import annotations

import json
import os

import pytest
import yaml

os.environ.setdefault("MUJOCO_GL", "egl")


def test_demo_end_to_end_at_a_reduced_size(tmp_path, capsys):
    from craftvla.cli import main
    from craftvla.demo import SHIPPED

    assert (SHIPPED / "model.safetensors").is_file(), "the generalist must ship with the repository"
    out = tmp_path / "demo"
    args = [
        "demo",
        "--out",
        str(out),
        "--steps",
        "2",
        "--episodes",
        "1",
        "--anchor_episodes",
        "1",
        "--eval_episodes",
        "1",
        "--old_tasks",
        "drawer-close-v3,door-open-v3",
        "--batch_size",
        "4",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    reports = sorted(out.glob("report-*"))
    assert len(reports) == 1
    report = reports[0]
    for name in ("report.md", "table.txt", "success.png", "craft_curves.png", "summary.json"):
        assert (report / name).is_file(), name
    videos = sorted(p.name for p in (report / "videos").iterdir())
    assert [v.split("_")[0] for v in videos] == ["craft", "generalist", "plain"]  # one rollout per policy
    summary = json.loads((report / "summary.json").read_text())["summary"]
    assert set(summary) == {"generalist", "plain", "craft"}
    for rows in summary.values():  # success rates as evaluated: one episode per task -> 0 or 1
        assert set(rows[0]["tasks"]) == {"window-open-v3", "drawer-close-v3", "door-open-v3"}
        assert all(v in (0.0, 1.0) for v in rows[0]["tasks"].values())
        assert rows[0]["old"] == pytest.approx(
            (rows[0]["tasks"]["drawer-close-v3"] + rows[0]["tasks"]["door-open-v3"]) / 2
        )
    assert (report / "table.txt").read_text() in printed
    run = out / "craft-s0" / "stage1" / "run"
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "craft/lambda" in m] == [1, 2]  # CRaFT ran and logged every step
    assert "data_anchor" in (run / "train_config.yaml").read_text()  # anchors: the old tasks' data
    craft = yaml.safe_load((run / "train_config.yaml").read_text())["craft"]
    assert (craft["retention_budget"], craft["dual_relative"]) == (0.03, True)  # the continual study's choice
    plain_s, craft_s = (
        json.loads(p.read_text().splitlines()[-1])["elapsed_s"]
        for p in (out / "plain-s0" / "stage1" / "run" / "metrics.jsonl", run / "metrics.jsonl")
    )
    expected = f"training time: plain {plain_s:.0f} s, CRaFT {craft_s:.0f} s ({craft_s / plain_s:.2f}x plain)"
    assert expected in (report / "table.txt").read_text()

    # a second run re-uses every finished stage and writes a second report
    assert main(args) == 0
    assert "re-using" in capsys.readouterr().out
    assert len(sorted(out.glob("report-*"))) == 2  # a new report, never over the first one


def test_demo_learns_a_sequence_of_tasks_and_resumes_on_a_fresh_machine(tmp_path, capsys):
    """`--tasks a,b`: each run learns a then b (b from a's policy, CRaFT anchoring on the old tasks and
    a), evaluates every task seen after each stage, and reports the accuracy matrices. A rerun trains
    nothing; with stage 1's weights gone (only its record kept), stage 2 retrains it, to the same weights."""
    import shutil

    import yaml

    from craftvla.cli import main

    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--tasks", "window-open-v3,drawer-open-v3", "--old_tasks", "drawer-close-v3"]
    args += ["--steps", "2", "--episodes", "1", "--anchor_episodes", "1", "--eval_episodes", "1", "--batch_size", "4"]
    assert main(args) == 0
    report = next(out.glob("report-*"))
    for name in ("matrices.png", "success.png", "craft_curves.png"):
        assert (report / name).is_file(), name
    text = (report / "table.txt").read_text()
    assert "average accuracy" in text and "backward transfer" in text
    assert "after stage" in (report / "report.md").read_text()
    craft = out / "craft-s0"
    config = yaml.safe_load((craft / "stage2" / "run" / "train_config.yaml").read_text())
    assert config["init_from"] == str(craft / "stage1" / "run" / "checkpoints" / "last")
    assert config["craft"]["anchor_dataset"] == f"{out / 'data_anchor'},{out / 'data_window-open-v3'}"
    stage1, stage2 = (json.loads((out / "plain-s0" / f"stage{k}" / "result.json").read_text()) for k in (1, 2))
    assert set(stage1["success"]) == {"drawer-close-v3", "window-open-v3"}
    assert set(stage2["success"]) == {"drawer-close-v3", "window-open-v3", "drawer-open-v3"}
    summary = json.loads((report / "summary.json").read_text())["summary"]
    final = summary["plain"][0]  # the last stage's success: new = the mean over both new tasks
    assert final["new"] == pytest.approx(
        (stage2["success"]["window-open-v3"] + stage2["success"]["drawer-open-v3"]) / 2
    )
    record = json.loads((craft / "stage2" / "result.json").read_text())
    assert record["start"]["sha256"] == json.loads((craft / "stage1" / "result.json").read_text())["sha256"]
    assert record["budget"] == 0.03 and 0.0 <= record["within_budget"] <= 1.0 and record["final_lambda"] >= 0.0

    capsys.readouterr()
    assert main(args) == 0  # finished: nothing trained or evaluated again
    printed = capsys.readouterr().out
    assert "): fine-tuning" not in printed and "): evaluating" not in printed
    assert printed.count("): re-using") == 4  # 2 methods x 2 stages

    for path in (craft / "stage1" / "run", craft / "stage2"):  # a fresh machine: stage 1's record kept
        shutil.rmtree(path)
    assert main(args) == 0
    again = json.loads((craft / "stage2" / "result.json").read_text())
    assert again["start"]["retrained"] is True
    assert again["start"]["matches_record"] is True  # CPU training is deterministic: the same weights
    assert again["sha256"] == record["sha256"]


def test_demo_refuses_a_task_twice_or_an_old_one(capsys):
    from craftvla.cli import main

    assert main(["demo", "--tasks", "window-open-v3,window-open-v3"]) != 0
    assert "listed twice" in capsys.readouterr().err
    assert main(["demo", "--tasks", "drawer-close-v3"]) != 0
    assert "among --old_tasks" in capsys.readouterr().err
