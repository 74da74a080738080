"""Flags that would silently do nothing are refused: an architecture flag under `--init_from` (the
policy is the checkpoint's), a plug-in section's field while its on-switch is off."""

import json

import pytest

from craftvla.errors import ConfigError
from craftvla.train.config import dump_train_config, parse_train_config
from tests.train.conftest import CAM, MICRO_ARGS, train_config

QUIET = ["--log.progress", "false", "--log.plots", "false"]


@pytest.fixture(scope="module")
def flow_checkpoint(tmp_path_factory):
    """A micro flow-matching policy (chunk 4, 2 LLM layers) saved as a checkpoint to fine-tune."""
    from craftvla.model.policy import VLAPolicy

    root = tmp_path_factory.mktemp("init") / "flow"
    cfg = train_config(root, "--policy.head.type", "flow_matching").policy.for_dataset([CAM], 4, 4)
    VLAPolicy(cfg).save_pretrained(root)
    return root


def test_init_from_adopts_the_checkpoints_policy(flow_checkpoint, tmp_path):
    cfg = parse_train_config(["--init_from", str(flow_checkpoint), "--output_dir", str(tmp_path), *QUIET])
    assert cfg.policy.head.type == "flow_matching"
    assert (cfg.policy.chunk_size, cfg.policy.llm.num_layers, cfg.policy.vision.image_size) == (4, 2, 32)
    assert cfg.preset is None


@pytest.mark.parametrize(
    "flag, value, field, saved",
    [
        ("--policy.head.type", "l1_bridge", "head.type", "'flow_matching'"),
        ("--policy.llm.num_layers", "8", "llm.num_layers", "2"),
        ("--policy.chunk_size", "16", "chunk_size", "4"),
    ],
)
def test_an_architecture_flag_under_init_from_is_refused_naming_it(flow_checkpoint, flag, value, field, saved):
    with pytest.raises(ConfigError, match=rf"^--policy\.{field}=.*its config\.json has {field}={saved}"):
        parse_train_config(["--init_from", str(flow_checkpoint), flag, value])


def test_a_preset_under_init_from_is_refused(flow_checkpoint):
    with pytest.raises(ConfigError, match="preset='tiny': conflicts with init_from"):
        parse_train_config(["--init_from", str(flow_checkpoint), "--preset", "tiny"])


def test_flags_equal_to_the_checkpoints_and_fine_tuning_fields_are_accepted(flow_checkpoint):
    cfg = parse_train_config(
        [
            "--init_from",
            str(flow_checkpoint),
            *MICRO_ARGS,
            "--policy.head.type",
            "flow_matching",
            "--policy.head.num_steps",
            "3",
            "--policy.action_clip",
            "none",
        ]
    )
    assert (cfg.policy.head.num_steps, cfg.policy.action_clip) == (3, "none")


def test_fine_tuning_trains_the_checkpoints_policy_with_the_runs_fields(flow_checkpoint, tiny_dataset, tmp_path):
    """The dataset's chunk follows the checkpoint (4, not the tiny preset's 8), and the fine-tuning
    fields reach the saved policy."""
    from craftvla.train.loop import train

    run = train(
        parse_train_config(
            [
                "--init_from",
                str(flow_checkpoint),
                "--dataset.root",
                str(tiny_dataset),
                "--output_dir",
                str(tmp_path / "run"),
                "--steps",
                "1",
                "--batch_size",
                "2",
                "--policy.action_clip",
                "none",
                "--policy.head.num_steps",
                "3",
                *QUIET,
            ]
        )
    )
    assert run.policy.action_head.cfg.num_steps == 3
    saved = json.loads((tmp_path / "run" / "checkpoints" / "last" / "config.json").read_text())
    assert (saved["head"]["type"], saved["chunk_size"], saved["action_clip"]) == ("flow_matching", 4, "none")
    assert saved["head"]["num_steps"] == 3


def test_a_config_built_in_code_must_hold_the_checkpoints_policy(flow_checkpoint, tmp_path):
    from craftvla.train.config import TrainConfig
    from craftvla.train.loop import train

    with pytest.raises(ConfigError, match=r"--policy\.head\.type='l1_bridge'"):
        train(TrainConfig(init_from=str(flow_checkpoint), output_dir=str(tmp_path)))


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--craft.anchor_dataset", "data/old_tasks"], "--craft.anchor_dataset"),
        (["--craft.retention_budget", "0.1"], "--craft.retention_budget"),  # the default value, still a no-op
        (["--lora.alpha", "4"], "--lora.alpha"),
        (["--eval.episodes", "3"], "--eval.episodes"),
    ],
)
def test_a_section_field_without_its_switch_is_refused(flags, named):
    with pytest.raises(ConfigError, match=rf"^{named}: set while .* turn the section on"):
        parse_train_config([*MICRO_ARGS, *flags])


def test_a_section_field_with_its_switch_is_accepted_and_a_dumped_config_reads_back(tmp_path):
    cfg = parse_train_config(
        [
            *MICRO_ARGS,
            "--craft.enabled",
            "true",
            "--craft.retention_budget",
            "0.2",
            "--lora.rank",
            "4",
            "--lora.alpha",
            "4",
            "--eval.freq",
            "5",
            "--eval.episodes",
            "3",
        ]
    )
    assert (cfg.craft.retention_budget, cfg.lora.alpha, cfg.eval.episodes) == (0.2, 4, 3)
    dump_train_config(parse_train_config(MICRO_ARGS), str(tmp_path / "plain.yaml"))  # every field written
    again = parse_train_config(["--config", str(tmp_path / "plain.yaml")])
    assert not again.craft.enabled and again.policy == parse_train_config(MICRO_ARGS).policy
