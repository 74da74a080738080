"""`craftvla demo` at a reduced size: the shipped generalist, both fine-tunings, the report."""

from __future__ import annotations

import json
import os

import pytest

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
    metrics = [json.loads(x) for x in (out / "craft-s0" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "craft/lambda" in m] == [1, 2]  # CRaFT ran and logged every step
    assert "data_anchor" in (out / "craft-s0" / "train_config.yaml").read_text()  # anchors: the old tasks' data
    plain_s, craft_s = (
        json.loads(p.read_text().splitlines()[-1])["elapsed_s"]
        for p in (out / "plain-s0" / "metrics.jsonl", out / "craft-s0" / "metrics.jsonl")
    )
    expected = f"training time: plain {plain_s:.0f} s, CRaFT {craft_s:.0f} s ({craft_s / plain_s:.2f}x plain)"
    assert expected in (report / "table.txt").read_text()

    # a second run re-uses every finished stage and writes a second report
    assert main(args) == 0
    assert "re-using" in capsys.readouterr().out
    assert len(sorted(out.glob("report-*"))) == 2  # a new report, never over the first one
