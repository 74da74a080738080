"""Drive one Meta-World episode through a running `craftvla serve`, as a robot (or a remote
simulator) would: render, send the observation, execute the returned chunk, repeat.

    craftvla serve --checkpoint assets/generalist/checkpoint --port 8000 &
    MUJOCO_GL=egl .venv/bin/python examples/serve_metaworld.py --url ws://127.0.0.1:8000 --task drawer-close-v3
"""

from __future__ import annotations

import argparse

from craftvla.keys import IMAGE_PREFIX, STATE_KEY, TASK_KEY
from craftvla.serve.client import PolicyClient
from craftvla.sim.metaworld import EVAL_STREAM, MetaWorldEnv, episode_seed


def run_episode(
    url: str, task: str, seed: int = 0, max_steps: int = 200, execute_steps: int = 4, api_key: str | None = None
) -> tuple[bool, int]:
    """(success, steps) of one episode whose every action came from the server."""
    with PolicyClient(url, api_key=api_key) as client:
        meta = client.metadata  # camera keys, image size, chunk size: what to render and send
        cameras = [k.removeprefix(IMAGE_PREFIX) for k in meta["camera_keys"]]
        with MetaWorldEnv(task, image_size=meta["image_size"], cameras=cameras) as env:
            obs = env.reset(episode_seed(seed, EVAL_STREAM, task, 0))
            for step in range(max_steps):
                if step % execute_steps == 0:  # re-plan: one request, a chunk of H actions back
                    request = {k: obs[k] for k in [*meta["camera_keys"], STATE_KEY, TASK_KEY]}
                    chunk = client.actions(request)  # (H, 4) in the env's units
                obs, success = env.step(chunk[step % execute_steps])
                if success:
                    return True, step + 1
    return False, max_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8000")
    parser.add_argument("--task", default="drawer-close-v3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api_key", default=None)
    args = parser.parse_args()
    success, steps = run_episode(args.url, args.task, args.seed, api_key=args.api_key)
    print(f"{args.task}: {'success' if success else 'failure'} after {steps} steps")


if __name__ == "__main__":
    main()
