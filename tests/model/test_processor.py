"""The processor saved with every checkpoint, and `policy.infer` on raw observations."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from craftvla import VLAPolicy
from craftvla.data.loading import collate
from craftvla.errors import CraftVLAError
from craftvla.keys import TOKENS_KEY, TOKENS_MASK_KEY
from craftvla.model.processor import crop_text_padding
from tests.launch import CHILD_TIMEOUT_S

from .conftest import micro_config

CAM = "observation.images.corner"
STATS = {
    "observation.state": {"mean": np.array([1.0, 2.0, 3.0, 4.0]), "std": np.array([2.0, 2.0, 2.0, 2.0])},
    "action": {
        "mean": np.array([0.5, 0.0, 0.0, 0.0]),
        "std": np.array([2.0, 1.0, 1.0, 1.0]),
        "min": np.array([-1.0, -1.0, -1.0, -0.5]),
        "max": np.array([1.0, 1.0, 1.0, 0.5]),
    },
}


def observation(size: int = 32, task: str = "close the drawer") -> dict:
    rng = np.random.default_rng(0)
    return {
        CAM: rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        "observation.state": np.array([3.0, 2.0, 1.0, 0.0], np.float32),
        "task": task,
    }


@pytest.fixture
def policy():
    torch.manual_seed(0)
    policy = VLAPolicy(micro_config()).eval()
    policy.processor.set_stats(STATS, "test")
    return policy


def test_observations_become_the_model_batch(policy):
    obs = observation()
    batch = policy.processor.observations([obs])
    expected_image = torch.from_numpy(obs[CAM]).permute(2, 0, 1).float()[None] / 255  # (1, 3, H, W) in [0, 1]
    assert torch.equal(batch[CAM], expected_image)
    assert batch["observation.state"].tolist() == [[1.0, 0.0, -1.0, -2.0]]  # (x - mean) / std by hand
    ids, mask = policy.tokenize(["close the drawer"])
    assert torch.equal(batch[TOKENS_KEY], ids) and torch.equal(batch[TOKENS_MASK_KEY], mask)


def test_images_of_another_size_are_resized(policy):
    big = policy.processor.observations([observation(size=64)])[CAM]
    assert big.shape == (1, 3, 32, 32)
    with pytest.raises(CraftVLAError, match="32x32"):  # the model itself takes only its own size
        policy.vision([torch.zeros(1, 3, 64, 64)])


def test_actions_unnormalised_and_clipped_by_hand(policy):
    chunk = torch.tensor([[[0.0, 0.5, -3.0, 0.25], [1.0, -0.5, 0.0, -1.0]]])  # (1, 2, 4) normalised
    # x * std + mean: [0.5, 0.5, -3, 0.25], [2.5, -0.5, 0, -1]; then clipped to [min, max]
    assert policy.processor.actions(chunk).tolist() == [[[0.5, 0.5, -1.0, 0.25], [1.0, -0.5, 0.0, -0.5]]]
    policy.processor.config.action_clip = "none"
    assert policy.processor.actions(chunk)[0, 1].tolist() == [2.5, -0.5, 0.0, -1.0]


def test_infer_equals_the_batched_path(policy):
    obs = [observation(task="close the drawer"), observation(task="press the button from the top")]
    one = policy.infer(obs[1])
    both = policy.infer_batch(obs)
    assert one.shape == (policy.config.chunk_size, policy.config.action_dim) and one.dtype == np.float32
    np.testing.assert_allclose(both[1], one, atol=1e-5)
    with torch.no_grad():
        manual = policy.processor.actions(policy.predict_action_chunk(policy.processor.observations(obs)))
    np.testing.assert_array_equal(both, manual)


@pytest.mark.parametrize(
    "broken,words",
    [
        (lambda o: o.pop("task"), "lacks ['task']"),
        (lambda o: o.update({CAM: o[CAM].astype(np.float32)}), "expected (H, W, 3) uint8"),
        (lambda o: o.update({"observation.state": np.zeros(3)}), "expects (4,)"),
    ],
)
def test_bad_observations_are_clear_errors(policy, broken, words):
    obs = observation()
    broken(obs)
    with pytest.raises(CraftVLAError) as err:
        policy.infer(obs)
    assert words in str(err.value)


def test_a_policy_without_statistics_says_so():
    policy = VLAPolicy(micro_config())
    with pytest.raises(CraftVLAError, match="no normalisation statistics"):
        policy.infer(observation())


def test_worker_tokens_cropped_equal_batch_tokenisation(policy):
    """Items tokenised one by one (DataLoader workers, padded to max_text_tokens) and collated
    equal tokenising the whole batch at once; the model then sees identical inputs."""
    tasks = ["open", "press the button from the top", "close the drawer"]
    items = []
    for task in tasks:
        item = {
            CAM: torch.rand(3, 32, 32),
            "observation.state": torch.zeros(4),
            "task": task,
            "action": torch.zeros(8, 4),
            "action_is_pad": torch.zeros(8, dtype=torch.bool),
        }
        items.append(policy.processor.transform(item))
    assert items[0][TOKENS_KEY].shape == (policy.config.llm.max_text_tokens,)
    batch = collate(items)
    ids, mask = policy.tokenize(tasks)
    assert torch.equal(batch[TOKENS_KEY], ids) and torch.equal(batch[TOKENS_MASK_KEY], mask)
    with torch.no_grad():
        with_tokens = policy.predict_action_chunk(batch)
        without = policy.predict_action_chunk(
            {k: v for k, v in batch.items() if k not in (TOKENS_KEY, TOKENS_MASK_KEY)}
        )
    assert torch.equal(with_tokens, without)
    assert crop_text_padding({"task": tasks}) == {"task": tasks}  # nothing to crop without tokens


def test_infer_does_not_import_the_simulator(tmp_path, policy):
    policy.save_pretrained(tmp_path / "ckpt")
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        from craftvla import VLAPolicy
        policy = VLAPolicy.from_pretrained({str(tmp_path / "ckpt")!r})
        obs = {{"{CAM}": np.zeros((32, 32, 3), np.uint8), "observation.state": np.zeros(4, np.float32),
               "task": "close the drawer"}}
        actions = policy.infer(obs)
        assert actions.shape == (8, 4), actions.shape
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("mujoco", "metaworld") or m.startswith("craftvla.sim"))
        assert not leaked, leaked
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_pil_bicubic_resize_is_pillows_on_both_paths():
    """image_resize pil_bicubic (a VLA-Adapter release's): a 48 px frame becomes exactly Pillow's
    bicubic 32 px image, from raw observations and from decoded float training frames alike."""
    from PIL import Image

    policy = VLAPolicy(micro_config(image_resize="pil_bicubic")).eval()
    policy.processor.set_stats(STATS, "test")
    frame = np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    expected = torch.from_numpy(np.array(Image.fromarray(frame).resize((32, 32), Image.BICUBIC)))
    expected = expected.permute(2, 0, 1).float()[None] / 255.0  # (1, 3, 32, 32)
    obs = observation() | {CAM: frame}
    assert torch.equal(policy.processor.observations([obs])[CAM], expected)
    decoded = torch.from_numpy(frame).permute(2, 0, 1).float()[None] / 255.0
    assert torch.equal(policy.processor.resize(decoded), expected)
    bilinear = VLAPolicy(micro_config()).processor.resize(decoded)
    assert (bilinear - expected).abs().max() > 0.05  # the default is another resize
