"""A VLA-Adapter release written by VLA-Adapter's own code (fixtures/vla_adapter/make_release.py:
their model, save_pretrained, processor, tokenizer, prompt, head and un-normalisation, at reduced
sizes) loads in craftvla and computes what their code computed, stage by stage, from one raw
observation: prompt tokens, pixels, proprio, every LLM layer's states, the head, the actions."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from craftvla import VLAPolicy
from craftvla.config import VisionConfig
from craftvla.files import read_safetensors
from craftvla.keys import TOKENS_KEY
from craftvla.model import released

CHAIN = Path(__file__).parent / "fixtures/vla_adapter/chain"
REAL_BASE = released.release_base


def reduced_base():
    """The real-shaped preset with the fixture's reduced towers (what a release's files do not say)."""
    base = REAL_BASE()
    vision = VisionConfig(backbone_id="tiny-dinosiglip", image_size=32, patch_size=8, width=32, depth=2, num_heads=2)
    return dataclasses.replace(base, vision=vision)


@pytest.fixture(scope="module")
def chain():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(released, "release_base", reduced_base)
        policy = VLAPolicy.from_pretrained(CHAIN / "release").eval()
    meta = json.loads((CHAIN / "reference.json").read_text())
    theirs = dict(read_safetensors(CHAIN / "reference.safetensors"))
    cameras = policy.config.camera_keys
    observation = {
        cameras[0]: theirs["image"].numpy(),
        cameras[1]: theirs["wrist_image"].numpy(),
        "observation.state": theirs["state"].numpy(),
        "task": meta["task"],
    }
    batch = policy.processor.observations([observation])
    with torch.no_grad():
        context = policy.encode(batch)
    return policy, meta, theirs, observation, batch, context


def test_the_prompt_pixels_and_proprio_are_theirs(chain):
    policy, meta, theirs, _, batch, _ = chain
    ids = torch.cat([torch.tensor([[policy._bos_id]]), batch[TOKENS_KEY]], dim=1)
    assert ids.tolist() == theirs["input_ids"].tolist()  # their prompt, their tokenizer, <|im_start|> first
    for c, camera in enumerate(policy.config.camera_keys):  # per image: DINOv2's 3 channels, then SigLIP's 3
        for t, tower in enumerate(policy.vision.towers):
            pixels = theirs["pixel_values"][:, 6 * c + 3 * t : 6 * c + 3 * t + 3]
            torch.testing.assert_close(tower.normalize(batch[camera]), pixels, rtol=0, atol=1e-6)
    torch.testing.assert_close(batch["observation.state"], theirs["proprio"][None], rtol=0, atol=1e-6)


def test_every_llm_layer_gives_the_head_their_states(chain):
    """Task stream: fp32 agreement over 24 layers (measured <= 2.6e-5 on states of mean size ~1-4).
    Action stream: their code casts it to bf16 before the head; ours cast the same way is the same bf16
    value, up to one bf16 step where the fp32 states straddle a rounding boundary."""
    policy, meta, theirs, _, _, context = chain
    n = meta["num_patches"]
    streams = policy.action_head.streams(context)
    assert len(streams) == theirs["hidden"].shape[1] - 1 == 24
    for layer, (adapter, task, _) in enumerate(streams, start=1):
        hidden = theirs["hidden"][:, layer]  # (1, N + 64, D)
        torch.testing.assert_close(task, hidden[:, :n], rtol=0, atol=1e-4, msg=f"task, layer {layer}")
        actions = adapter[:, :-1].bfloat16().float()
        torch.testing.assert_close(actions, hidden[:, n:], rtol=2**-7, atol=1e-4, msg=f"actions, layer {layer}")


def _their_casts(policy, context, proprio: torch.Tensor) -> list:
    """Our streams with their two bf16 casts applied (action states; proprio before its projector)."""
    head = policy.action_head
    token = head.proprio(proprio.bfloat16().float()).unsqueeze(1)  # (1, 1, D)
    return [(torch.cat([a[:, :-1].bfloat16().float(), token], 1), t, m) for a, t, m in head.streams(context)]


def test_the_head_and_unnormalisation_give_their_actions(chain):
    policy, meta, theirs, _, batch, context = chain
    head, n = policy.action_head, meta["num_patches"]
    zeros = torch.zeros(1, policy.config.chunk_size, head.in_dim)
    with torch.no_grad():
        token = head.proprio(theirs["proprio"][None].bfloat16().float()).unsqueeze(1)
        given = [(torch.cat([h[:, n:], token], 1), h[:, :n], None) for h in theirs["hidden"][0, 1:, None]]
        from_theirs = head.model(zeros, given)  # their states into our head
        end_to_end = head.model(zeros, _their_casts(policy, context, batch["observation.state"]))
    torch.testing.assert_close(from_theirs, theirs["normalized"], rtol=0, atol=1e-5)
    actions = torch.from_numpy(policy.processor.actions(from_theirs)[0])
    torch.testing.assert_close(actions, theirs["actions"], rtol=0, atol=1e-5)
    torch.testing.assert_close(end_to_end, theirs["normalized"], rtol=0, atol=1e-4)


def test_infer_without_their_bf16_casts_is_close(chain):
    """craftvla's own fp32 path (no bf16 casts inside an fp32 forward) differs from theirs by what those
    casts change: measured 2.7e-3 in robot units on this fixture."""
    policy, _, theirs, observation, _, _ = chain
    difference = (torch.from_numpy(policy.infer(observation)) - theirs["actions"]).abs().max().item()
    assert 0 < difference < 1e-2
