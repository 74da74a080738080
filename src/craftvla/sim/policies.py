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
from craftvla.keys import ENV_TASK_KEY, IMAGE_PREFIX, RAW_OBS_KEY, STATE_KEY, TASK_KEY

from .metaworld import ScriptedExpert


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
        actions = [self._expert(o[ENV_TASK_KEY]).act(o[RAW_OBS_KEY]) for o in observations]
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
    """A trained `VLAPolicy` driven through `policy.infer_batch`: its processor converts the
    observations (images, state, instruction) and returns actions in env units, clipped as the
    checkpoint says; Meta-World's observation dicts already carry the keys it reads."""

    def __init__(self, policy: Any, device: str = "cpu") -> None:
        self.device = device
        self.policy = policy.to(device).eval()
        cfg = policy.config
        bad = [k for k in cfg.camera_keys if not k.startswith(IMAGE_PREFIX)]
        if bad:
            raise CraftVLAError(f"checkpoint camera_keys {bad}: expected names like '{IMAGE_PREFIX}corner'")
        self.cameras = [k.removeprefix(IMAGE_PREFIX) for k in cfg.camera_keys]
        self.image_size = int(cfg.vision.image_size)
        self.chunk_size = int(cfg.chunk_size)
        self.training_tasks = policy.processor.training_tasks  # instructions seen in training; None = unknown

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu") -> CheckpointPolicy:
        """Load a `save_pretrained` directory (config.json + model.safetensors + processor files)."""
        from craftvla.model.policy import VLAPolicy

        path = Path(path)
        if not (path / "config.json").is_file():
            raise CraftVLAError(f"{path}: not a checkpoint directory (no config.json)")
        return cls(VLAPolicy.from_pretrained(path), device=device)

    def reset(self) -> None:
        """Clear the model's own state, if it keeps any."""
        if hasattr(self.policy, "reset"):
            self.policy.reset()

    def predict_chunk(self, observations: list[dict[str, Any]]) -> np.ndarray:
        return self.policy.infer_batch(observations)  # (B, H, A) env units


class ServerPolicy:
    """A policy behind `craftvla serve` (or any server speaking openpi's protocol with craftvla's
    observation keys): one request per environment, the chunk the server returns."""

    image_size: int | None

    def __init__(self, url: str, api_key: str | None = None) -> None:
        from craftvla.serve.client import PolicyClient

        self.client = PolicyClient(url, api_key=api_key)
        meta = self.client.metadata
        missing = [k for k in ("camera_keys", "chunk_size", "image_size") if k not in meta]
        if missing:
            raise CraftVLAError(f"{url}: the server's metadata lacks {missing} (not a craftvla server?)")
        self.keys = [*meta["camera_keys"], STATE_KEY, meta.get("instruction_key", TASK_KEY)]
        self.cameras = [k.removeprefix(IMAGE_PREFIX) for k in meta["camera_keys"]]
        self.chunk_size, self.image_size = int(meta["chunk_size"]), int(meta["image_size"])

    def reset(self) -> None:
        """The server keeps no per-episode state."""

    def predict_chunk(self, observations: list[dict[str, Any]]) -> np.ndarray:
        chunks = [self.client.actions({k: o[k] for k in self.keys}) for o in observations]
        return np.stack(chunks).astype(np.float32)  # (B, H, A)
