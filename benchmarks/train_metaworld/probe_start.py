"""Does a policy's first action chunk depend on where the object is? (The diagnostic behind the
plateau: a policy that ignores the image predicts the same first chunk at every position.)

    .venv/bin/python benchmarks/train_metaworld/probe_start.py --checkpoints A,B --task button-press-topdown-v3

For `--positions` unseen start states (the evaluation seed stream) it records the summed x-motion
of the first predicted chunk next to the object's x (the first entry of Meta-World's random
vector), for the policy and for the scripted expert run for the same number of steps, and writes
the standard deviation across positions and the correlation with the object's x
(`probe_start.json`, one entry per checkpoint, rewritten each run).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")

from craftvla.sim.metaworld import EVAL_STREAM, MetaWorldEnv, ScriptedExpert, episode_seed  # noqa: E402
from craftvla.sim.policies import CheckpointPolicy  # noqa: E402

HERE = Path(__file__).resolve().parent


def first_chunks(policy: CheckpointPolicy, task: str, positions: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(object x, policy's summed dx, expert's summed dx) over `positions` start states."""
    xs, ours, expert_dx = [], [], []
    size = policy.policy.config.vision.image_size
    with MetaWorldEnv(task, image_size=size, cameras=policy.cameras) as env:
        for i in range(positions):
            obs = env.reset(episode_seed(0, EVAL_STREAM, task, i))
            xs.append(env.positions[0])
            chunk = policy.predict_chunk([obs])[0]  # (H, A) robot units
            ours.append(chunk[:, 0].sum())
            expert, total = ScriptedExpert(task), 0.0
            for _ in range(len(chunk)):
                action = expert.act(obs["raw_obs"])
                total += float(np.clip(action[0], -1, 1))
                obs, _ = env.step(action)
            expert_dx.append(total)
    return np.array(xs), np.array(ours), np.array(expert_dx)


def summarise(xs: np.ndarray, dx: np.ndarray) -> dict[str, float]:
    corr = float(np.corrcoef(xs, dx)[0, 1]) if dx.std() > 0 else 0.0
    return {"std_summed_dx": float(dx.std()), "corr_with_object_x": corr, "mean_summed_dx": float(dx.mean())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", required=True, help="comma-separated checkpoint directories")
    parser.add_argument("--task", default="button-press-topdown-v3")
    parser.add_argument("--positions", type=int, default=40)
    parser.add_argument("--out", default=str(HERE / "probe_start.json"))
    args = parser.parse_args()
    results = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    for path in args.checkpoints.split(","):
        xs, ours, expert = first_chunks(CheckpointPolicy.from_pretrained(path), args.task, args.positions)
        results[path] = {
            "task": args.task,
            "positions": args.positions,
            "policy": summarise(xs, ours),
            "expert": summarise(xs, expert),
        }
        print(path, json.dumps(results[path]))
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
