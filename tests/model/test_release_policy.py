"""A VLA-Adapter release directory as a whole policy: its head, statistics, prompt and sizes."""

import dataclasses
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from craftvla import VLAPolicy
from craftvla.config import VLAAdapterHeadConfig
from craftvla.data.transforms import Normalize, Unnormalize
from craftvla.errors import CraftVLAError
from craftvla.model import released
from craftvla.model.heads.vla_adapter import VLAAdapterHead
from craftvla.model.processor import render_prompt

from .test_released_checkpoints import _small_config, write_vla_adapter_release

KEY = "libero_spatial_no_noops"
ACTION = {
    "q01": [-1.0, -0.5, 0.0, 0.0],
    "q99": [1.0, 0.5, 2.0, 1.0],
    "mask": [True, True, True, False],  # the gripper is not normalised
    "min": [-2.0, -1.0, 0.0, 0.0],
    "max": [2.0, 1.0, 3.0, 1.0],
    "mean": [0.0, 0.0, 1.0, 0.5],
    "std": [1.0, 1.0, 1.0, 0.5],
}
PROPRIO = {"q01": [0.0, 0.0, 0.0, 0.0], "q99": [2.0, 4.0, 1.0, 1.0], "min": [0.0, 0.0, 0.0, 1.0], "max": [2, 4, 1, 1.0]}


def small_base():
    """The release's unstated architecture at toy size (the tests' stand-in for the real preset)."""
    return dataclasses.replace(_small_config("unused"), weights_dir=None, num_action_queries=8)


def write_release(root: Path, key: str = KEY) -> dict:
    """write_vla_adapter_release's files, with a real (toy) Pro head file, statistics and config.json."""
    write_vla_adapter_release(root)
    torch.manual_seed(1)
    head = VLAAdapterHead(VLAAdapterHeadConfig(), llm_dim=64, num_layers=2, state_dim=4, action_dim=4,
                          chunk_size=8, num_vision_tokens=32)  # fmt: skip
    state = OrderedDict((f"module.model.{k}", v.bfloat16()) for k, v in head.model.state_dict().items())
    torch.save(state, root / "action_head--checkpoint.pt")
    config = json.loads((root / "config.json").read_text()) | {"vision_backbone_id": "tiny-dinosiglip"}
    (root / "config.json").write_text(json.dumps(config))
    stats = {key: {"action": ACTION, "proprio": PROPRIO, "num_transitions": 10, "num_trajectories": 2}}
    (root / "dataset_statistics.json").write_text(json.dumps(stats))
    return state


@pytest.fixture
def release(tmp_path, monkeypatch):
    monkeypatch.setattr(released, "release_base", small_base)
    root = tmp_path / "LIBERO-Spatial-Pro"
    return root, write_release(root)


def test_q01_q99_normalisation_by_hand():
    stats = {"action": {k: np.array(v, dtype=np.float32) for k, v in ACTION.items()}}
    x = torch.tensor([[0.0, 0.5, 3.0, 0.7], [-3.0, -0.25, 1.0, 1.0]])
    out = Normalize(stats, {"action": "q01_q99"})({"action": x})["action"]
    # 2 (x - q01) / (q99 - q01) - 1, clipped to [-1, 1]; the masked-off gripper as it is
    torch.testing.assert_close(out, torch.tensor([[0.0, 1.0, 1.0, 0.7], [-1.0, -0.5, 0.0, 1.0]]))
    back = Unnormalize(stats, {"action": "q01_q99"})({"action": torch.tensor([[0.0, 1.0, 1.5, 0.7]])})["action"]
    torch.testing.assert_close(back, torch.tensor([[0.0, 0.5, 2.5, 0.7]]))  # not clipped: 1.5 -> 2.5 > q99
    constant = {
        "action": {"q01": np.zeros(2), "q99": np.ones(2), "min": np.array([0.0, 5.0]), "max": np.array([1, 5.0])}
    }
    out = Normalize(constant, {"action": "q01_q99"})({"action": torch.tensor([[0.5, 5.0]])})["action"]
    assert out.tolist() == [[0.0, 0.0]]  # a dim with min == max is 0 (theirs: unused dims)


def test_a_release_directory_is_a_policy(release):
    root, head_state = release
    policy = VLAPolicy.from_pretrained(root).eval()
    cfg = policy.config
    assert (cfg.chunk_size, cfg.action_dim, cfg.state_dim, len(cfg.camera_keys)) == (8, 4, 4, 2)
    assert cfg.head == VLAAdapterHeadConfig(pro=True) and cfg.action_clip == "none"
    assert cfg.normalization == {"observation.state": "q01_q99", "action": "q01_q99"}
    assert policy.processor.stats_source == f"{root / 'dataset_statistics.json'} [{KEY}]"
    ours = policy.action_head.model.state_dict()
    for key, value in head_state.items():
        assert torch.equal(ours[key.removeprefix("module.model.")], value.float()), key
    rng = np.random.default_rng(0)
    obs = {k: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for k in cfg.camera_keys}
    obs |= {"observation.state": np.array([1.0, 5.0, -1.0, 1.0], np.float32), "task": "Open The Drawer"}
    batch = policy.processor.observations([obs])
    assert batch["observation.state"].tolist() == [[0.0, 1.0, -1.0, 0.0]]  # clipped; min == max -> 0
    chunk = policy.predict_action_chunk(batch)[0]  # (8, 4) normalised
    q01, q99 = torch.tensor(ACTION["q01"]), torch.tensor(ACTION["q99"])
    by_hand = torch.where(torch.tensor(ACTION["mask"]), 0.5 * (chunk + 1) * (q99 - q01 + 1e-8) + q01, chunk)
    np.testing.assert_allclose(policy.infer(obs), by_hand.numpy(), atol=1e-5)


def test_the_sequence_opens_with_the_prompts_first_token_and_closes_with_theirs(release):
    root, _ = release
    policy = VLAPolicy.from_pretrained(root)
    llm = policy.config.llm
    assert llm.prompt == released.VLA_ADAPTER_PROMPT and llm.lowercase_task
    full = policy.tokenizer(render_prompt(llm, "open the drawer"), add_special_tokens=False)["input_ids"]
    assert render_prompt(llm, "Open The Drawer").startswith("<|im_start|>system\nYou are Qwen")
    ids, mask = policy.processor.tokenize(["Open The Drawer"])
    assert ids[0].tolist() == full[1 : 1 + llm.max_text_tokens] and mask.all()  # bytes: 128 of its 201
    assert (policy._bos_id, policy._stop_id) == (full[0], 2)
    with torch.no_grad():
        embeds, layout, _, _ = policy._sequence(policy.config.fake_batch(1), policy.action_queries.weight)
    torch.testing.assert_close(embeds[0, 0], policy.llm.embed(torch.tensor([full[0]]))[0])
    torch.testing.assert_close(embeds[0, -1], policy.llm.embed(torch.tensor([2]))[0])


def test_a_fine_tuned_release_saves_as_a_craftvla_checkpoint(release, tmp_path):
    root, _ = release
    policy = VLAPolicy.from_pretrained(root).eval()
    policy.save_pretrained(tmp_path / "ckpt")
    again = VLAPolicy.from_pretrained(tmp_path / "ckpt").eval()
    assert again.config.llm.prompt == released.VLA_ADAPTER_PROMPT and again.processor.stats_source.endswith(f"[{KEY}]")
    batch = policy.config.fake_batch(2)
    torch.testing.assert_close(again.predict_action_chunk(batch), policy.predict_action_chunk(batch))


@pytest.mark.parametrize(
    "change,words",
    [
        ("two_datasets", "2 datasets.*keep the entry"),
        ("bridge", "'bridge_orig'.*chunk length.*calvin', 'libero'"),
        ("vision", "vision_backbone_id 'siglip-224px'"),
        ("no_q01", "libero_spatial_no_noops.proprio has no q01/q99"),
    ],
)
def test_release_errors_name_the_file_and_the_problem(release, change, words):
    root, _ = release
    stats_path, config_path = root / "dataset_statistics.json", root / "config.json"
    stats = json.loads(stats_path.read_text())
    if change == "two_datasets":
        stats["other"] = stats[KEY]
    elif change == "bridge":
        stats = {"bridge_orig": stats[KEY]}
    elif change == "no_q01":
        del stats[KEY]["proprio"]["q01"]
    else:
        config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"vision_backbone_id": "siglip-224px"}))
    stats_path.write_text(json.dumps(stats))
    with pytest.raises(CraftVLAError, match=words):
        VLAPolicy.from_pretrained(root)


def test_info_prints_what_a_release_holds(release, capsys):
    from craftvla.model.summary import main

    root, _ = release
    assert main(["--weights_dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert "action_head: action_head--checkpoint.pt" in out and "the Pro head" in out
    assert f"dataset_statistics.json: dataset '{KEY}'" in out
    assert "will load: head vla_adapter (pro=True), chunk 8 x 4 actions, state 4" in out
