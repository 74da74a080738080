"""The pruning benchmark's method table (benchmarks/pruning/methods.py), its bases (bench.py) and its
real-shape harness (benchmarks/pruning/real_shapes.py, at the tiny-256 preset: 256 vision tokens, 4 LLM layers)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.pruning.methods import recipe
from craftvla.config import PruningConfig

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "pruning" / "real_shapes.py"


@pytest.mark.parametrize("budget", [0.5, 0.25, 0.125])
def test_recipes_place_their_selections_by_depth(budget):
    fastv = PruningConfig(**recipe("fastv", budget).pruning())
    assert fastv.schedule(4) == [(1, min(1.0, 2 * budget)), (2, budget)]
    assert fastv.schedule(24) == [(6, min(1.0, 2 * budget)), (12, budget)]  # the real shapes' 24 layers
    pool = recipe("pool", budget)
    assert pool.apply_flags() == ["--merger", "pool", "--merge_ratio", f"{budget:g}"] and pool.stage1 is None
    assert PruningConfig(**pool.pruning()).merge_ratio == budget


def test_the_learned_recipe_trains_both_stages_and_is_the_merger_alone_at_half():
    quarter = recipe("learned", 0.25)
    assert (quarter.stage1, quarter.stage2, quarter.keep) == (0.5, True, (1.0, 0.5))
    assert quarter.apply_flags() == []  # nothing parameter-free to apply: both parts are trained
    assert recipe("learned", 0.5) == recipe("merger", 0.5)  # the benchmark evaluates that policy once
    window = recipe("window", 0.25)
    assert (window.merger, window.stage1, window.apply_flags()) == ("learned_window", 0.25, [])
    learned_vit = recipe("window_vit", 0.25)
    assert (learned_vit.stage1, learned_vit.apply_flags()) == (0.25, [])
    assert learned_vit.stage1_flags()[-2:] == ["--vision_merger", "learned_window"]
    assert recipe("pool_vit", 0.125).apply_flags() == [
        *("--vision_merge_ratio", "0.125", "--vision_merge_depth", "0.33")
    ]
    assert recipe("pruners_only", 0.25).keep == (0.5, 0.25) and recipe("pruners_only", 0.25).stage1 is None


def test_real_shapes_harness_runs_every_row_at_a_small_preset(tmp_path):
    out = tmp_path / "rs.json"
    args = [sys.executable, str(SCRIPT), "--preset", "tiny-256", "--out", str(out), "--threads", "1", "--warmup", "0"]
    flops = subprocess.run([*args, "--rounds", "0"], capture_output=True, text=True, timeout=300)
    assert flops.returncode == 0, flops.stderr[-2000:]
    assert "unpruned: " in flops.stdout and "| unpruned | 256 |" in flops.stdout and "| - | - |" in flops.stdout
    # another timing set-up (2 rounds of 2 calls, not 0 of 3): the FLOPs are kept, the rounds run
    done = subprocess.run([*args, "--rounds", "2", "--repeats", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "unpruned: " not in done.stdout  # no FLOPs counted again
    record = json.loads(out.read_text())
    rows = record["rows"]
    assert "learned__b0.5" not in rows and "merger__b0.5" in rows  # the same recipe is timed once
    assert rows["unpruned"]["speed_up"] == 1.0 and len(record["rounds"]) == 2
    assert rows["unpruned"]["vision_tokens"] == [[0, 256]]
    assert rows["fastv__b0.25"]["vision_tokens"] == [[0, 256], [1, 128], [2, 64]]
    assert rows["learned__b0.25"]["vision_tokens"] == [[0, 128], [1, 128], [2, 64]]
    assert rows["pool_vit__b0.25"]["vision_tokens"] == [[0, 64]]
    for name, row in rows.items():
        split = row["flops"]
        parts = sum(split[k] for k in ("vision", "projector", "merger", "llm"))
        assert 0.8 * split["total"] < parts < 0.99 * split["total"], name  # the rest: the action head
        assert row["ms"] == pytest.approx(sum(row["round_ms"]) / 2)  # the median of two rounds
    assert rows["pool__b0.25"]["flops_ratio"] < rows["pool__b0.5"]["flops_ratio"] < 1.0
    assert rows["pool__b0.25"]["flops"]["vision"] == rows["unpruned"]["flops"]["vision"]  # towers run in full
    assert rows["pool_vit__b0.25"]["flops"]["projector"] < rows["pool__b0.25"]["flops"]["projector"]  # pooled sooner
    assert "| pool__b0.25 | 64 |" in done.stdout  # the table


def test_real_shapes_refuses_to_write_a_toy_preset_into_results():
    done = subprocess.run([sys.executable, str(SCRIPT), "--preset", "tiny"], capture_output=True, text=True)
    assert done.returncode == 2 and "pass --out" in done.stderr


@pytest.fixture
def bench(monkeypatch):
    """benchmarks/pruning/bench.py as a module, with no smoke-run variables set."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks" / "pruning"))
    import bench as module

    for name in module.SMOKE_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("BENCH_WORK", raising=False)
    monkeypatch.delenv("BENCH_RESULTS", raising=False)
    return module


def test_the_benchmark_bases_keep_their_committed_results_and_refuse_a_smoke_runs(bench, monkeypatch):
    from craftvla.model.checkpoints import read_policy_config

    tiny = bench.Bench.of("tiny-256")
    committed = ROOT / "benchmarks" / "pruning" / "results"
    assert tiny.results == committed and bench.base_policy(tiny) == bench.PUBLISHED
    assert json.loads((committed / "unpruned.json").read_text())["setup"] == tiny.base.setup()
    assert bench.finished(tiny, committed / "pool__b0.25.json")
    assert json.loads((bench.PUBLISHED / "setup.json").read_text()) == tiny.base.base_setup()
    generalist = bench.Bench.of("generalist")
    shipped = bench.base_policy(generalist)
    assert shipped == ROOT / "assets" / "generalist" / "checkpoint"
    cfg = read_policy_config(shipped / "config.json")
    assert (cfg.vision.image_size // cfg.vision.patch_size) ** 2 * len(cfg.camera_keys) == generalist.base.tokens
    assert cfg.vision.image_size == generalist.base.image
    assert generalist.results == ROOT / "benchmarks" / "pruning" / "generalist" / "results"
    assert len(generalist.cells()) == len(bench.METHODS) * 5 + len(bench.ABLATIONS)
    monkeypatch.setenv("BENCH_EPISODES", "2")
    smoke = bench.Bench.of("tiny-256")
    assert smoke.smoke and smoke.base.episodes == 2 and smoke.results != committed
    with pytest.raises(SystemExit, match="set-up"):
        bench.finished(smoke, committed / "pool__b0.25.json")


def test_real_shapes_times_a_chosen_subset_of_methods_beside_unpruned(tmp_path):
    out = tmp_path / "subset.json"
    args = [sys.executable, str(SCRIPT), "--preset", "tiny-256", "--out", str(out), "--rounds", "0"]
    done = subprocess.run([*args, "--methods", "pool_vit,tome_vit"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert sorted(rows) == sorted(
        ["unpruned", *(f"{m}__b{b:g}" for m in ("pool_vit", "tome_vit") for b in (0.5, 0.25, 0.125))]
    )
    assert rows["tome_vit__b0.25"]["pruning"]["vision_merger"] == "tome"
    assert rows["tome_vit__b0.25"]["vision_tokens"] == [[0, 64]]
    tome, pool = rows["tome_vit__b0.25"]["flops"], rows["pool_vit__b0.25"]["flops"]
    assert tome["total"] < rows["unpruned"]["flops"]["total"]
    assert tome["vision"] > pool["vision"]  # the matching's cost (tiny-256's one tower block runs before it)
    refused = subprocess.run([*args, "--methods", "nope"], capture_output=True, text=True)
    assert refused.returncode == 2 and "unknown ['nope']" in refused.stderr
