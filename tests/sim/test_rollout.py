"""The runner: chunk execution and re-planning, batching, determinism, random row."""

import numpy as np

from craftvla.keys import IMAGE_PREFIX, STATE_KEY
from craftvla.sim.metaworld import EVAL_STREAM
from craftvla.sim.policies import RandomPolicy
from craftvla.sim.rollout import RolloutSpec, run_episodes


class CountingPolicy:
    """Predicts chunks of H zero actions with a marker; records each call's batch size."""

    cameras = ["corner"]
    image_size = 32

    def __init__(self, chunk_size):
        self.chunk_size, self.calls = chunk_size, []

    def reset(self):
        self.calls = []

    def predict_chunk(self, observations):
        assert all(o["observation.images.corner"].shape == (32, 32, 3) for o in observations)
        self.calls.append(len(observations))
        chunk = np.zeros((len(observations), self.chunk_size, 4), np.float32)
        chunk[:, :, 3] = np.arange(self.chunk_size)[None] / 10  # step index in the chunk
        return chunk


def test_executes_k_of_h_then_replans_in_one_batched_call():
    policy = CountingPolicy(chunk_size=8)
    spec = RolloutSpec(max_steps=10, execute_steps=3, num_envs=3, image_size=32, record=True)
    episodes = list(run_episodes(policy, "drawer-close-v3", 3, spec))
    assert sorted(e.index for e in episodes) == [0, 1, 2]
    assert policy.calls == [3, 3, 3, 3]  # ceil(10 / 3) re-plans, each batching the 3 envs
    for e in episodes:
        grips = [round(float(f["action"][3]) * 10) for f in e.frames]
        assert grips == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]  # the first 3 of each chunk, in order
        assert e.length == 10 and not e.success


def test_random_row_is_deterministic_and_its_positions_independent_of_batching():
    spec = RolloutSpec(seed=5, stream=EVAL_STREAM, max_steps=15, record=True)
    runs = [list(run_episodes(RandomPolicy(seed=1), "door-open-v3", 2, spec)) for _ in range(2)]
    for a, b in zip(*runs):
        np.testing.assert_array_equal(
            np.stack([f[STATE_KEY] for f in a.frames]), np.stack([f[STATE_KEY] for f in b.frames])
        )
    # Batched, the random stream is shared between envs (so later states differ), but each
    # episode starts from the same object position: its first rendered frame is the same.
    first = {}
    for num_envs in (1, 2):
        spec = RolloutSpec(
            seed=5, stream=EVAL_STREAM, max_steps=2, num_envs=num_envs, record=True, cameras=("corner",), image_size=32
        )
        episodes = run_episodes(RandomPolicy(seed=1), "door-open-v3", 2, spec)
        first[num_envs] = {e.index: e.frames[0][IMAGE_PREFIX + "corner"] for e in episodes}
    assert sorted(first[1]) == sorted(first[2]) == [0, 1]
    for i in (0, 1):
        np.testing.assert_array_equal(first[1][i], first[2][i])
    assert not np.array_equal(first[1][0], first[1][1])  # two different positions
