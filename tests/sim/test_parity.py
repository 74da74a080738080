"""Training/evaluation parity: one Meta-World frame, through `collect` + the dataset + the training
transform, and through `policy.infer`'s observation path, gives the model the same inputs."""

import numpy as np
import pytest
import torch

from craftvla import VLAPolicy
from craftvla.data import LeRobotDataset
from craftvla.data.loading import collate
from craftvla.keys import STATE_KEY, TASK_KEY, TOKENS_KEY, TOKENS_MASK_KEY
from craftvla.sim.collect import CollectConfig, collect
from craftvla.sim.metaworld import COLLECT_STREAM, MetaWorldEnv, episode_seed
from tests.model.conftest import micro_config

TASK = "drawer-close-v3"
CAM = "observation.images.corner"


@pytest.fixture(scope="module")
def frame_both_ways(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity") / "ds"
    collect(CollectConfig(out=str(root), tasks=TASK, episodes=1, image_size=64, max_steps=200, seed=3))
    dataset = LeRobotDataset(root, chunk_size=4)
    torch.manual_seed(0)
    policy = VLAPolicy(micro_config())  # 32 px: both paths resize the 64 px render
    policy.processor.set_stats(dataset.stats, "dataset")
    dataset.transform = policy.processor.transform
    trained_on = collate([dataset[0]])  # what `craftvla train` feeds the model for frame 0
    with MetaWorldEnv(TASK, image_size=64, cameras=("corner",)) as env:
        obs = env.reset(episode_seed(3, COLLECT_STREAM, TASK, 0))  # the same position, fresh
    return trained_on, policy.processor.observations([obs]), obs


def test_state_and_instruction_are_identical(frame_both_ways):
    trained_on, inferred, obs = frame_both_ways
    assert trained_on[TASK_KEY] == inferred[TASK_KEY] == [obs[TASK_KEY]] == ["close the drawer"]
    assert torch.equal(trained_on[STATE_KEY], inferred[STATE_KEY])  # the same normalised float32 state
    assert torch.equal(trained_on[TOKENS_KEY], inferred[TOKENS_KEY])
    assert torch.equal(trained_on[TOKENS_MASK_KEY], inferred[TOKENS_MASK_KEY])


def test_image_has_the_same_orientation_and_scale(frame_both_ways):
    trained_on, inferred, _ = frame_both_ways
    a, b = trained_on[CAM], inferred[CAM]  # (1, 3, 32, 32) each, in [0, 1]
    assert a.shape == b.shape == (1, 3, 32, 32) and a.dtype == b.dtype == torch.float32
    err = (a - b).abs().mean().item()  # only the video codec's error separates them
    assert err < 0.03, err  # measured 0.014 (h264 at 64 px, resized to 32)
    assert abs(a.mean().item() - b.mean().item()) < 0.01  # the same scale (not 0-255, not 2x)
    for flipped in (b.flip(-2), b.flip(-1)):  # upside down or mirrored would be far further away
        assert (a - flipped).abs().mean().item() > 5 * err


@pytest.mark.parametrize(
    "mode,normalised,expected",
    [
        ("mean_std", [1.0, -0.5], [0.5 + 2.0 * 1.0, 1.0 - 0.5 * 4.0]),  # x * std + mean
        ("min_max", [1.0, -0.5], [3.0, 0.0 + 0.25 * 8.0]),  # (x + 1) / 2 * (max - min) + min
        ("identity", [1.0, -0.5], [1.0, -0.5]),
    ],
)
def test_unnormalisation_by_hand_for_every_mode(mode, normalised, expected):
    cfg = micro_config(action_dim=2, action_clip="none", normalization={STATE_KEY: "identity", "action": mode})
    policy = VLAPolicy(cfg)
    stats = {
        "action": {
            "mean": np.array([0.5, 1.0]),
            "std": np.array([2.0, 4.0]),
            "min": np.array([-1.0, 0.0]),
            "max": np.array([3.0, 8.0]),
        },
        STATE_KEY: {"mean": np.zeros(4), "std": np.ones(4)},
    }
    policy.processor.set_stats(stats, "test")
    chunk = torch.tensor([[normalised]])  # (B=1, H=1, A=2)
    np.testing.assert_allclose(policy.processor.actions(chunk)[0, 0], expected, rtol=1e-6)
    item = policy.processor.normalize({"action": torch.tensor([expected])})  # and back
    np.testing.assert_allclose(item["action"][0].numpy(), normalised, rtol=1e-6, atol=1e-7)
