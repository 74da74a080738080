"""LoRA through PEFT: only adapters train; checkpoints hold a merged, plainly loadable policy."""

from __future__ import annotations

import torch

from craftvla.model.peft import is_lora_param
from craftvla.model.policy import VLAPolicy
from craftvla.train import state
from craftvla.train.loop import build_policy, fit, setup
from tests.train.conftest import train_config


def test_lora_trains_only_adapters_and_exports_merged(tmp_path):
    cfg = train_config(
        tmp_path / "run",
        "--steps",
        "3",
        "--batch_size",
        "2",
        "--lora.rank",
        "4",
        "--freeze.vision",
        "true",
        "--freeze.projector",
        "true",
        "--freeze.action_queries",
        "true",
        "--freeze.action_head",
        "true",
        "--optim.lr",
        "1e-2",
    )
    run = setup(cfg)
    trainable = {n for n, p in run.policy.named_parameters() if p.requires_grad}
    assert trainable and all(is_lora_param(n) for n in trainable)
    assert any("q_proj" in n for n in trainable) and any("v_proj" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in run.policy.named_parameters()}
    fit(run)
    changed = {n for n, p in run.policy.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable  # nothing outside the adapters moved
    assert any("lora_B" in n for n in changed)

    last = tmp_path / "run" / "checkpoints" / "last"
    exported = VLAPolicy.from_pretrained(last).eval()  # merged: plain VLAPolicy keys
    assert not any("lora" in k for k in exported.state_dict())
    batch = run.policy.config.fake_batch(2, seed=5)
    run.policy.eval()
    torch.testing.assert_close(
        exported.predict_action_chunk(batch), run.policy.predict_action_chunk(batch), atol=1e-5, rtol=1e-4
    )

    fresh = build_policy(cfg, None)  # resume path: the unmerged weights come back exactly
    state.load_model_weights(last, fresh)
    assert all(torch.equal(p, dict(run.policy.named_parameters())[n]) for n, p in fresh.named_parameters())


def test_vla_adapters_lora_recipe_adapts_every_linear_of_vision_projector_and_llm(tmp_path):
    """--lora.components vision,projector,llm --lora.target_modules all-linear (VLA-Adapter's
    finetune.py): adapters on every Linear of the three; the head and queries still train in full;
    the merged checkpoint is a plain policy that predicts what the adapted one does."""
    from craftvla.model.peft import LoraConfig, merged_copy

    cfg = train_config(tmp_path / "run", "--steps", "2", "--batch_size", "2", "--lora.rank", "4",
                       "--lora.alpha", "8", "--lora.components", "[vision,projector,llm]",
                       "--lora.target_modules", "[all-linear]")  # fmt: skip
    assert cfg.lora == LoraConfig(
        rank=4, alpha=8.0, target_modules=["all-linear"], components=["vision", "projector", "llm"]
    )
    run = setup(cfg)
    trainable = {n for n, p in run.policy.named_parameters() if p.requires_grad}
    for component, module in (("vision", "qkv"), ("vision", "fc2"), ("projector", "fc1"), ("llm", "gate_proj")):
        assert any(n.startswith(component + ".") and f"{module}.lora_A" in n for n in trainable), (component, module)
    frozen_base = [n for n in trainable if n.split(".")[0] in ("vision", "projector", "llm") and not is_lora_param(n)]
    assert not frozen_base  # within the adapted components only the adapters train
    assert any(n.startswith("action_head.") for n in trainable) and "action_queries.weight" in trainable
    fit(run)
    batch = run.policy.config.fake_batch(2)
    merged = merged_copy(run.policy).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged.predict_action_chunk(batch), run.policy.eval().predict_action_chunk(batch))


def test_lora_components_are_checked():
    import pytest

    from craftvla.errors import ConfigError
    from craftvla.model.peft import LoraConfig

    with pytest.raises(ConfigError, match="lora.components"):
        LoraConfig(rank=4, components=["head"])
