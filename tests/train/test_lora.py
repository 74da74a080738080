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
