"""A broken checkpoint directory is one CraftVLAError naming the file and the problem, in the
library and as one line from `craftvla eval`; loading never writes anything."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from craftvla.config import VLAConfig
from craftvla.errors import CraftVLAError
from craftvla.model.policy import VLAPolicy


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    cfg = VLAConfig.preset("tiny")
    cfg.vision.image_size, cfg.vision.depth, cfg.llm.num_layers = 32, 2, 2
    policy = VLAPolicy(cfg)
    policy.processor.set_stats({"action": {"mean": np.zeros(4, np.float32), "std": np.ones(4, np.float32)}}, "test")
    out = tmp_path_factory.mktemp("ckpt") / "ckpt"
    policy.save_pretrained(out)
    return out


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CASES = {
    "config missing": (lambda c: (c / "config.json").unlink(), "config.json", "file not found"),
    "config not JSON": (lambda c: (c / "config.json").write_text('{"vision": '), "config.json", "not valid JSON"),
    "config not an object": (lambda c: (c / "config.json").write_text("[]"), "config.json", "expected a JSON dict"),
    "config unknown key": (
        lambda c: _edit_json(c / "config.json", lambda d: d.update(head_size=3)),
        "config.json",
        "head_size",
    ),
    "config bad value": (
        lambda c: _edit_json(c / "config.json", lambda d: d.update(chunk_size="eight")),
        "config.json",
        "chunk_size",
    ),
    "config newer format": (
        lambda c: _edit_json(c / "config.json", lambda d: d.update(craftvla_format=99)),
        "config.json",
        "written by a newer craftvla",
    ),
    "config no format": (
        lambda c: _edit_json(c / "config.json", lambda d: d.pop("craftvla_format")),
        "config.json",
        "not a craftvla checkpoint config",
    ),
    "llm config not JSON": (lambda c: (c / "llm_config.json").write_text("qwen2"), "llm_config.json", "not valid JSON"),
    "llm config unknown type": (
        lambda c: _edit_json(c / "llm_config.json", lambda d: d.update(model_type="qwen99")),
        "llm_config.json",
        "not a transformers config",
    ),
    "weights missing": (lambda c: (c / "model.safetensors").unlink(), "model.safetensors", "file not found"),
    "weights truncated": (
        lambda c: _truncate(c / "model.safetensors"),
        "model.safetensors",
        "not a readable safetensors",
    ),
    "weights not safetensors": (
        lambda c: (c / "model.safetensors").write_text("PK\x03\x04 a zip"),
        "model.safetensors",
        "not a readable safetensors",
    ),
    "weights for another config": (
        lambda c: _edit_json(c / "config.json", lambda d: d.update(chunk_size=4)),
        "model.safetensors",
        "does not match the model",
    ),
    "stats not JSON": (lambda c: (c / "stats.json").write_text("{mean: 0}"), "stats.json", "not valid JSON"),
    "stats not statistics": (
        lambda c: (c / "stats.json").write_text('{"action": 3}'),
        "stats.json",
        "not a dict of statistics",
    ),
    "config format 1": (
        lambda c: _edit_json(c / "config.json", lambda d: d.update(craftvla_format=1)),
        "config.json",
        "written before the model-core rebuild",
    ),
    "processor missing": (lambda c: (c / "processor.json").unlink(), "processor.json", "file not found"),
    "processor no source": (lambda c: (c / "processor.json").write_text("{}"), "processor.json", "stats_source"),
    "tokenizer missing": (lambda c: shutil.rmtree(c / "tokenizer"), "tokenizer", "tokenizer directory missing"),
    "tokenizer corrupt": (
        lambda c: (c / "tokenizer" / "tokenizer.json").write_text("{"),
        "tokenizer",
        "cannot load the tokenizer",
    ),
}


def _tree(root: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_checkpoint_names_the_file(saved, tmp_path, case):
    corrupt, rel, words = CASES[case]
    ckpt = Path(shutil.copytree(saved, tmp_path / "ckpt"))
    corrupt(ckpt)
    before = _tree(ckpt)
    with pytest.raises(CraftVLAError) as err:
        VLAPolicy.from_pretrained(ckpt)
    msg = str(err.value)
    assert str(ckpt / rel) in msg and words in msg and "\n" not in msg, msg
    assert _tree(ckpt) == before


def test_intact_copy_loads(saved):
    policy = VLAPolicy.from_pretrained(saved)
    assert policy.processor.stats["action"]["std"].tolist() == [1.0] * 4


def test_missing_directory(tmp_path):
    with pytest.raises(CraftVLAError, match="checkpoint directory not found"):
        VLAPolicy.from_pretrained(tmp_path / "nope")


@pytest.mark.parametrize("case", ["weights truncated", "config not JSON"])
def test_eval_cli_reports_one_line(saved, tmp_path, case, capsys):
    from craftvla.cli import main

    ckpt = Path(shutil.copytree(saved, tmp_path / "ckpt"))
    CASES[case][0](ckpt)
    assert main(["eval", "--checkpoint", str(ckpt), "--episodes", "1", "--out", str(tmp_path / "ev")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("craftvla eval: error:") and str(ckpt) in err and "\n" not in err
    assert not (tmp_path / "ev").exists()
