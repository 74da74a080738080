"""Every verb and sub-verb answers --help with its flags and comments under its own name, and
bad flags end in one line and a non-zero code (no traceback)."""

from __future__ import annotations

import pytest

from craftvla.cli import VERBS, main

# verb argv -> (a flag it must list, words from that flag's comment)
HELP = {
    ("collect",): ("--episodes", "episodes to keep per task"),
    ("train",): ("--craft.retention_budget", "retention budget"),
    ("eval",): ("--checkpoint", "checkpoint"),
    ("cache", "build"): ("--anchor_type", "the token set"),
    ("demo",): ("--steps", "steps"),
    ("serve",): ("--api_key", "Api-Key"),
    ("convert", "rlds"): ("--map", "RLDS=LeRobot pairs"),
    ("info",): ("--preset", "preset"),
    ("prune", "train"): ("--objective", "distill (MSE to the unselected states), adversarial"),
    ("prune", "eval"): ("--batch_sizes", "latency measurement"),
}


def test_every_verb_is_covered():
    assert {argv[0] for argv in HELP} == set(VERBS)


@pytest.mark.parametrize("argv", list(HELP), ids=" ".join)
def test_help_lists_flags_under_the_verb_name(argv, capsys):
    flag, words = HELP[argv]
    assert main([*argv, "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert out.startswith(f"usage: craftvla {' '.join(argv)} ")
    assert flag in out and words in out


def test_prune_without_sub_verb_lists_train_and_eval(capsys):
    assert main(["prune", "--help"]) == 0
    out = capsys.readouterr().out
    assert "craftvla prune <train|eval>" in out and "--stage 1" in out
    assert main(["prune"]) == 2


def test_cache_without_sub_verb_lists_build(capsys):
    assert main(["cache", "--help"]) == 0
    assert "craftvla cache build" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--steps", "x"],
        ["collect", "--nope", "1"],
        ["eval", "--episodes"],
        ["cache", "build", "--layer", "two"],
        ["info", "--preset", "huge"],
        ["prune", "train", "--stage", "3"],
        ["prune", "eval", "--keep", "half"],
    ],
)
def test_bad_flags_are_one_line_errors(argv, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"craftvla {argv[0]}: error:") and "\n" not in err and "Traceback" not in err


def test_broken_yaml_config_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1e-3\n")  # an unclosed list
    assert main(["train", "--config", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert f"{bad}: not valid YAML" in err and "\n" not in err
    bad.write_text("optim:\n  lr_max: 1e-3\n")  # valid YAML, unknown key
    assert main(["train", "--config", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert str(bad) in err and "lr_max" in err and "\n" not in err


def test_broken_policy_yaml_names_the_file(tmp_path):
    from craftvla.cli.parsing import parse_config
    from craftvla.config import VLAConfig
    from craftvla.errors import ConfigError

    bad = tmp_path / "policy.yaml"
    bad.write_text("vision: {image_size: 64\n")
    with pytest.raises(ConfigError, match=str(bad)):
        parse_config(VLAConfig, config_path=str(bad))


@pytest.fixture()
def broken_dataset(tmp_path):
    """The lerobot-written fixture with fps 0 in meta/info.json."""
    import json
    import shutil
    from pathlib import Path

    root = Path(shutil.copytree(Path(__file__).parent / "data/fixtures/lerobot_v30/dataset", tmp_path / "ds"))
    info = json.loads((root / "meta/info.json").read_text())
    info["fps"] = 0
    (root / "meta/info.json").write_text(json.dumps(info))
    return root


def _one_line_naming(capsys, path, words):
    err = capsys.readouterr().err.strip()
    assert f"{path}: {words}" in err and "\n" not in err and "Traceback" not in err, err


def test_train_on_a_broken_dataset_is_one_line(broken_dataset, tmp_path, capsys):
    assert (
        main(["train", "--steps", "1", "--dataset.root", str(broken_dataset), "--output_dir", str(tmp_path / "r")]) == 1
    )
    _one_line_naming(capsys, broken_dataset / "meta/info.json", "fps=0")


def test_cache_build_on_a_broken_dataset_is_one_line(broken_dataset, tmp_path, capsys):
    from craftvla.config import VLAConfig
    from craftvla.model.policy import VLAPolicy

    cfg = VLAConfig.preset("tiny")
    cfg.vision.depth, cfg.llm.num_layers = 1, 2
    VLAPolicy(cfg).save_pretrained(tmp_path / "ckpt")
    assert (
        main(
            [
                "cache",
                "build",
                "--checkpoint",
                str(tmp_path / "ckpt"),
                "--dataset",
                str(broken_dataset),
                "--out",
                str(tmp_path / "c"),
                "--device",
                "cpu",
            ]
        )
        == 1
    )
    _one_line_naming(capsys, broken_dataset / "meta/info.json", "fps=0")
    assert not (tmp_path / "c").exists()


def test_error_from_a_dataloader_worker_is_cut_to_our_line(tmp_path):
    """torch re-raises a worker's exception with the worker's traceback inside the message."""
    import shutil
    from pathlib import Path

    from torch.utils.data import DataLoader

    from craftvla.cli import _message
    from craftvla.data import LeRobotDataset
    from craftvla.errors import CraftVLAError

    root = Path(shutil.copytree(Path(__file__).parent / "data/fixtures/lerobot_v30/dataset", tmp_path / "ds"))
    mp4 = next((root / "videos").rglob("*.mp4"))
    mp4.write_bytes(mp4.read_bytes()[: int(mp4.stat().st_size * 0.6)])  # readable header, missing frames
    ds = LeRobotDataset(root)
    with pytest.raises(CraftVLAError) as err:
        list(DataLoader(ds, batch_size=len(ds), num_workers=1))
    assert "Traceback" in str(err.value)  # what torch hands back
    line = _message(err.value)
    assert line.startswith(f"{mp4}: cannot decode") and "\n" not in line and "Traceback" not in line


def _options(text: str) -> list[tuple[str, str]]:
    """(flag, its help text) for each option listed after the usage block."""
    import re

    body = text.split("\n\n", 1)[1]
    entries = re.split(r"\n(?=  --)", body)
    out = []
    for entry in entries:
        match = re.match(r"\s*(--[\w.]+)(?: \[?\w+\]?)?(.*)", entry, flags=re.S)
        if match:
            out.append((match.group(1), " ".join(match.group(2).split())))
    return out


@pytest.mark.parametrize("argv", list(HELP), ids=" ".join)
def test_every_flag_has_a_help_text_and_no_section_file_flags(argv, capsys):
    assert main([*argv, "--help"]) == 0
    text = capsys.readouterr().out
    assert "Config file for" not in text
    options = _options(text)
    assert len(options) > 3
    missing = [
        flag
        for flag, words in options
        if not words.replace("(default:", "").strip(" )").split(" ", 1)[0] or words.startswith("(default:")
    ]
    assert not missing, f"flags without a help text: {missing}"


def test_info_help_lists_every_preset(capsys):
    from craftvla.config import PRESETS

    assert main(["info", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse wraps at hyphens
    assert all(name in out for name in PRESETS)
