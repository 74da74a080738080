"""Policies the closed-loop runner can drive: scripted experts, random actions, a checkpoint.

All share one small interface (`SimPolicy`): given a list of B observation dicts (one per env,
see `MetaWorldEnv`), `predict_chunk` returns raw env actions (B, H, 4) in [-1, 1]; the runner
executes the first k of the H and asks again. `cameras` lists the images the policy needs
(empty: the runner does not render unless it records a video).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from craftvla.errors import CraftVLAError

from .metaworld import IMAGE_PREFIX, RAW_OBS_KEY, STATE_KEY, TASK_KEY, ScriptedExpert, instruction


class SimPolicy(Protocol):
    """What `rollout.run_episodes` needs from a policy."""

    chunk_size: int  # H: actions predicted per call
    cameras: list[str]  # camera names whose images the policy reads ([] = none)
    image_size: int | None  # the render size it expects (None = any)

    def reset(self) -> None:
        """Forget any internal state (called before a batch of episodes)."""

    def predict_chunk(self, observations: list[dict[str, Any]]) -> np.ndarray:
        """B observation dicts -> (B, H, 4) float32 env actions in [-1, 1]."""


class ExpertPolicy:
    """Meta-World's scripted expert of each observation's task (one action per call)."""

    chunk_size = 1
    cameras: list[str] = []
    image_size = None

    def __init__(self) -> None:
        self._experts: dict[str, ScriptedExpert] = {}

    def reset(self) -> None:
        """The experts are stateless functions of the observation."""

    def predict_chunk(self, observations: list[dict[str, Any]]) -> np.ndarray:
        actions = [self._expert(o[TASK_KEY]).act(o[RAW_OBS_KEY]) for o in observations]
        return np.stack(actions)[:, None, :]  # (B, 1, 4)

    def _expert(self, task: str) -> ScriptedExpert:
        if task not in self._experts:
            self._experts[task] = ScriptedExpert(task)
        return self._experts[task]


class RandomPolicy:
    """Uniform random actions in [-1, 1], seeded: a floor for success rates."""

    cameras: list[str] = []
    image_size = None

    def __init__(self, seed: int = 0, chunk_size: int = 1) -> None:
        self.seed, self.chunk_size = seed, chunk_size
        self.reset()

    def reset(self) -> None:
        """Restart the random stream, so every evaluation call is reproducible."""
        self.rng = np.random.default_rng(self.seed)

    def predict_chunk(self, observations: list[dict[str, Any]]) -> np.ndarray:
        shape = (len(observations), self.chunk_size, 4)  # (B, H, 4)
        return self.rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)


class CheckpointPolicy:
    """A trained `VLAPolicy`: normalises the state, runs `predict_action_chunk`, unnormalises.

    Images go in as (B, 3, H, W) float in [0, 1] (the model resizes if its size differs); the
    instruction of each env's task is the text input, the same sentence `collect` stored.
    """

    def __init__(self, policy: Any, device: str = "cpu") -> None:
        import torch

        from craftvla.data.transforms import Normalize, Unnormalize

        self.torch, self.device = torch, torch.device(device)
        self.policy = policy.to(self.device).eval()
        cfg = policy.config
        self.camera_keys = list(cfg.camera_keys)
        bad = [k for k in self.camera_keys if not k.startswith(IMAGE_PREFIX)]
        if bad:
            raise CraftVLAError(f"checkpoint camera_keys {bad}: expected names like '{IMAGE_PREFIX}corner'")
        self.cameras = [k.removeprefix(IMAGE_PREFIX) for k in self.camera_keys]
        self.image_size = int(cfg.vision.image_size)
        self.chunk_size = int(cfg.chunk_size)
        mapping = {k: v for k, v in dict(cfg.normalization).items() if k in (STATE_KEY, "action")}
        stats = policy.dataset_stats or {}
        self.normalize = Normalize(stats, {k: v for k, v in mapping.items() if k == STATE_KEY})
        self.unnormalize = Unnormalize(stats, {k: v for k, v in mapping.items() if k == "action"})

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu") -> CheckpointPolicy:
        """Load a `save_pretrained` directory (config.json + model.safetensors + stats.json)."""
        from craftvla.model.policy import VLAPolicy

        path = Path(path)
        if not (path / "config.json").is_file():
            raise CraftVLAError(f"{path}: not a checkpoint directory (no config.json)")
        return cls(VLAPolicy.from_pretrained(path), device=device)

    def reset(self) -> None:
        """Clear the model's own state, if it keeps any."""
        if hasattr(self.policy, "reset"):
            self.policy.reset()

    def batch(self, observations: list[dict[str, Any]]) -> dict[str, Any]:
        """Observation dicts -> the model's input batch (normalised state, [0, 1] images)."""
        torch = self.torch
        batch: dict[str, Any] = {"task": [instruction(o[TASK_KEY]) for o in observations]}
        for key in self.camera_keys:
            images = torch.from_numpy(np.stack([o[key] for o in observations]))  # (B, H, W, 3) uint8
            batch[key] = images.permute(0, 3, 1, 2).float().div_(255.0).to(self.device)  # (B, 3, H, W)
        batch[STATE_KEY] = torch.from_numpy(np.stack([o[STATE_KEY] for o in observations])).to(self.device)  # (B, S)
        return self.normalize(batch)

    def predict_chunk(self, observations: list[dict[str, Any]]) -> np.ndarray:
        with self.torch.inference_mode():
            chunk = self.policy.predict_action_chunk(self.batch(observations))  # (B, H, A) normalised
            chunk = self.unnormalize({"action": chunk.float()})["action"]  # (B, H, A) env units
        return np.clip(chunk.cpu().numpy(), -1.0, 1.0).astype(np.float32)
