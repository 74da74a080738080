"""Atomic checkpoints: a failure between writing and publishing leaves the previous `last` loadable."""

from __future__ import annotations

import pytest

from craftvla.model.policy import VLAPolicy
from craftvla.train import state
from craftvla.train.loop import train
from tests.train.conftest import train_config


def test_kill_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    flags = ["--steps", "3", "--batch_size", "2", "--checkpoint.save_freq", "1", "--checkpoint.keep_last", "5"]
    real_fsync_tree = state.fsync_tree

    def die_on_step_2(root):  # every file of checkpoint 2 is written; the process "dies" before the rename
        real_fsync_tree(root)
        if root.name == ".tmp-000002":
            raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(state, "fsync_tree", die_on_step_2)
    with pytest.raises(KeyboardInterrupt):
        train(train_config(run, *flags))
    ckpts = run / "checkpoints"
    assert (ckpts / "last").resolve().name == "000001"
    assert sorted(p.name for p in ckpts.iterdir()) == [".tmp-000002", "000001", "last"]
    policy = VLAPolicy.from_pretrained(ckpts / "last")  # the previous checkpoint loads
    assert policy.config.chunk_size == 4
    assert state.read_training_state(ckpts / "last", rank=0)["state"]["step"] == 1

    monkeypatch.setattr(state, "fsync_tree", real_fsync_tree)
    train(train_config(run, *flags, "--resume", "true"))  # resumes from 1, cleans the leftover
    assert sorted(p.name for p in ckpts.iterdir()) == ["000001", "000002", "000003", "last"]
    assert (ckpts / "last").resolve().name == "000003"


def test_unknown_config_key_is_a_clear_error(tmp_path):
    from craftvla.errors import ConfigError
    from craftvla.train.config import parse_train_config

    with pytest.raises(ConfigError, match="--optim.lrr"):
        parse_train_config(["--optim.lrr", "1e-3"])
    path = tmp_path / "bad.yaml"
    path.write_text("steps: 10\nlora:\n  rnak: 8\n")
    with pytest.raises(ConfigError, match="rnak"):
        parse_train_config(["--config", str(path)])
    with pytest.raises(ConfigError, match="batch_size=6: must be divisible by grad_accum_steps=4"):
        parse_train_config(["--batch_size", "6", "--grad_accum_steps", "4"])


def test_config_layers_preset_yaml_flags(tmp_path):
    from craftvla.train.config import parse_train_config

    path = tmp_path / "f.yaml"
    path.write_text("steps: 7\noptim:\n  lr: 0.001\npolicy:\n  chunk_size: 4\n")
    cfg = parse_train_config(["--config", str(path), "--steps", "9", "--policy.llm.num_layers", "2"])
    assert (cfg.steps, cfg.optim.lr, cfg.policy.chunk_size, cfg.policy.llm.num_layers) == (9, 1e-3, 4, 2)
    assert cfg.policy.llm.hidden_size == 192  # the rest comes from the tiny preset


def test_8bit_adamw_without_cuda_is_a_clear_error():
    import torch

    from craftvla.errors import CraftVLAError
    from craftvla.train.config import OptimConfig
    from craftvla.train.optim import build_optimizer

    if torch.cuda.is_available():
        pytest.skip("CUDA present: 8-bit AdamW is allowed")
    with pytest.raises(CraftVLAError, match="needs a CUDA GPU"):
        build_optimizer(torch.nn.Linear(2, 2), OptimConfig(name="adamw_8bit"))


def test_switching_the_preset_head_type_keeps_the_fields_the_new_type_has():
    from craftvla.config import DiscreteHeadConfig, FlowMatchingHeadConfig
    from craftvla.train.config import parse_train_config

    flow = parse_train_config(["--policy.head.type", "flow_matching"]).policy.head
    assert isinstance(flow, FlowMatchingHeadConfig) and (flow.hidden_dim, flow.flat_readout) == (128, 8)  # tiny's
    discrete = parse_train_config(["--policy.head.type", "discrete", "--policy.head.num_bins", "64"]).policy
    assert isinstance(discrete.head, DiscreteHeadConfig) and discrete.head.num_bins == 64
    assert discrete.num_action_queries == discrete.chunk_size * discrete.action_dim
