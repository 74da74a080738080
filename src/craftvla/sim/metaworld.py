"""Meta-World environments for pixel policies: fresh positions, fast offscreen rendering, experts.

Three things the stock Meta-World API does not give a VLA:
- **Fresh object/goal positions every episode.** `MT1` / `set_task` only replay 50 pre-generated
  random vectors; we build the task's env class directly and unfreeze its random vector
  (`_freeze_rand_vec = False`, `seeded_rand_vec = True`, as `metaworld._make_tasks` itself does),
  then reseed the env per episode from `episode_seed(...)`, so every episode is reproducible and
  collection and evaluation never share a position (separate seed streams).
- **Fast rendering.** Default MuJoCo quality renders 6-11 frames/s on a 2-core CPU; shadows and
  reflections off plus `model.vis.quality.offsamples = 0` (no multisample buffer) give ~100 fps
  at 64 px (`benchmarks/collect/`).
- **Upright images.** The fixed `corner*` cameras are mounted rolled 180 degrees (their image-up
  axis points at the floor), so raw renders are upside down; we rotate those by 180 degrees,
  deciding per camera from its orientation rather than from a hard-coded list.

EGL contexts are freed explicitly (`close()`, context manager, and an `atexit` hook for
envs a caller forgot), because contexts freed from `__del__` at interpreter exit can print
`EGLError` tracebacks.
"""

from __future__ import annotations

import atexit
import functools
import os
import warnings
import weakref
import zlib
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")  # before mujoco is imported: headless rendering

import mujoco  # noqa: E402
import numpy as np  # noqa: E402

from craftvla.errors import CraftVLAError  # noqa: E402
from craftvla.keys import ENV_TASK_KEY, IMAGE_PREFIX, RAW_OBS_KEY, STATE_KEY, TASK_KEY  # noqa: E402

# Keys of the observation dicts the runner and the policies exchange (LeRobot feature names).

# Proprio state = the first 4 entries of the Meta-World observation: end-effector (hand) xyz
# and the normalised gripper opening (sawyer_xyz_env._get_curr_obs_combined_no_goal).
STATE_NAMES = ["ee_x", "ee_y", "ee_z", "gripper_open"]
ACTION_NAMES = ["dx", "dy", "dz", "gripper"]  # Meta-World's 4-D action, each in [-1, 1]

# Seed streams: collection and evaluation draw episode positions from different streams, so the
# same --seed never puts an evaluation episode on a training position.
COLLECT_STREAM, EVAL_STREAM = 0, 1

# One instruction sentence per task, as a person would say it.
INSTRUCTIONS: dict[str, str] = {
    "assembly-v3": "put the ring on the peg",
    "basketball-v3": "dunk the ball into the basket",
    "bin-picking-v3": "move the cube from one bin to the other",
    "box-close-v3": "put the lid on the box",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-topdown-wall-v3": "press the button from the top behind the wall",
    "button-press-v3": "press the button from the front",
    "button-press-wall-v3": "press the button behind the wall",
    "coffee-button-v3": "press the button on the coffee machine",
    "coffee-pull-v3": "pull the mug away from the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "turn the dial",
    "disassemble-v3": "take the ring off the peg",
    "door-close-v3": "close the door",
    "door-lock-v3": "lock the door",
    "door-open-v3": "open the door",
    "door-unlock-v3": "unlock the door",
    "hand-insert-v3": "put your hand into the hole",
    "drawer-close-v3": "close the drawer",
    "drawer-open-v3": "open the drawer",
    "faucet-open-v3": "turn the faucet on",
    "faucet-close-v3": "turn the faucet off",
    "hammer-v3": "hammer the nail in",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "pick-place-wall-v3": "pick up the puck and place it behind the wall",
    "pick-out-of-hole-v3": "pick the peg out of the hole",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "plate-slide-v3": "slide the plate into the goal",
    "plate-slide-side-v3": "slide the plate sideways into the goal",
    "plate-slide-back-v3": "slide the plate back out of the goal",
    "plate-slide-back-side-v3": "slide the plate sideways out of the goal",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "peg-unplug-side-v3": "unplug the peg from the side",
    "soccer-v3": "kick the ball into the goal",
    "stick-push-v3": "push the bottle with the stick",
    "stick-pull-v3": "pull the bottle with the stick",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck around the wall to the goal",
    "push-back-v3": "pull the puck back to the goal",
    "reach-v3": "reach the goal",
    "reach-wall-v3": "reach the goal behind the wall",
    "shelf-place-v3": "put the puck on the shelf",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table",
    "window-open-v3": "open the window",
    "window-close-v3": "close the window",
}

# Defaults whose objects and goals are visible at 64 px; reach/push goals are 1-2 px there.
DEFAULT_TASKS = ("drawer-close-v3", "button-press-topdown-v3", "door-open-v3")
# Task set A of the generalist shipped in assets/generalist (goals visible at 64 px, experts >= 96 %),
# and the new task `craftvla demo` teaches it.
GENERALIST_TASKS = (*DEFAULT_TASKS, "handle-press-v3", "plate-slide-v3")
NEW_TASK = "window-open-v3"
DEFAULT_CAMERA = "corner"

_OPEN_ENVS: weakref.WeakSet = weakref.WeakSet()  # envs to close at exit if the caller did not


def _env_classes() -> dict[str, type]:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS  # heavy import; only when needed

    return ALL_V3_ENVIRONMENTS


def task_names() -> list[str]:
    """All Meta-World v3 task names, in the package's order."""
    return list(_env_classes())


def parse_tasks(tasks: str | list[str] | tuple[str, ...]) -> list[str]:
    """Split a comma-separated task list and check every name; CraftVLAError names a bad one."""
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t) for t in tasks]
    names = [t for t in names if t]
    if not names:
        raise CraftVLAError("--tasks: empty; give one or more Meta-World task names, e.g. drawer-close-v3")
    valid = task_names()
    for name in names:
        if name not in valid:
            raise CraftVLAError(f"--tasks: unknown Meta-World task {name!r}; valid tasks: {', '.join(valid)}")
    if len(set(names)) != len(names):
        raise CraftVLAError(f"--tasks: a task is listed twice: {names}")
    return names


def parse_cameras(cameras: str | list[str] | tuple[str, ...]) -> list[str]:
    """Split a comma-separated camera list and check the names against the Sawyer scene."""
    names = [c.strip() for c in cameras.split(",")] if isinstance(cameras, str) else list(cameras)
    names = [c for c in names if c]
    valid = camera_names()
    bad = [c for c in names if c not in valid]
    if not names or bad:
        raise CraftVLAError(f"--cameras: unknown or empty {bad or names}; valid cameras: {', '.join(valid)}")
    return names


@functools.lru_cache(maxsize=1)
def _camera_names() -> tuple[str, ...]:
    env = _env_classes()["reach-v3"]()
    try:
        return tuple(env.model.camera(i).name for i in range(env.model.ncam))
    finally:
        env.close()


def camera_names() -> list[str]:
    """Camera names defined in Meta-World's Sawyer scene (the same in every task)."""
    return list(_camera_names())


def control_fps(task: str) -> int:
    """The task's control frequency in Hz: 1 / (frame_skip * timestep) = 80 for every v3 task."""
    env = _env_classes()[task]()
    try:
        return int(round(1.0 / env.dt))
    finally:
        env.close()


def instruction(task: str) -> str:
    """The natural-language instruction for a task name (falls back to the spaced-out name)."""
    return INSTRUCTIONS.get(task, task.removesuffix("-v3").replace("-", " "))


def episode_seed(seed: int, stream: int, task: str, episode: int) -> int:
    """A 32-bit seed for one episode, independent of batching and of the other tasks.

    `stream` separates collection (0) from evaluation (1): the same `seed` never yields the same
    positions in both. crc32 (not `hash`) keeps task names stable across processes.
    """
    seq = np.random.SeedSequence([seed, stream, zlib.crc32(task.encode()), episode])
    return int(seq.generate_state(1)[0])


def camera_is_upside_down(model: mujoco.MjModel, data: mujoco.MjData, camera: str) -> bool:
    """True when the camera's image-up axis points below the horizon (a 180-degree roll)."""
    cam_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
    up_in_world = data.cam_xmat[cam_id].reshape(3, 3)[:, 1]  # column 1 = camera y (image up)
    return bool(up_in_world[2] < 0)


def make_renderer(model: mujoco.MjModel, size: int, fast: bool = True) -> mujoco.Renderer:
    """An offscreen renderer; `fast` turns off shadows, reflections and multisampling."""
    if fast:
        model.vis.quality.offsamples = 0  # no MSAA buffer: the main cost on a CPU (llvmpipe)
    _load_triton_before_egl()
    renderer = mujoco.Renderer(model, height=size, width=size)
    _register_exit_hook()
    if fast:
        renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
    return renderer


class MetaWorldEnv:
    """One Meta-World task with fresh positions per episode and upright camera images.

    `reset(episode_seed)` / `step(action)` return an observation dict:
      "observation.state": (4,) float32, "observation.images.<cam>": (H, W, 3) uint8 RGB
      (only when `cameras` is non-empty), "raw_obs": (39,) float64, "env_task": the task name,
      "task": its instruction — the keys `VLAPolicy.infer` reads, so an observation goes in as is.
    Use as a context manager (or call `close()`) so the EGL context is freed deterministically.
    """

    def __init__(
        self,
        task: str,
        image_size: int = 64,
        cameras: tuple[str, ...] | list[str] = (DEFAULT_CAMERA,),
        fast_render: bool = True,
    ) -> None:
        parse_tasks([task])
        self.task, self.cameras, self.image_size = task, list(cameras), int(image_size)
        self.env = _env_classes()[task]()
        self._unfreeze(self.env)
        self.renderer = make_renderer(self.env.model, self.image_size, fast_render) if self.cameras else None
        mujoco.mj_forward(self.env.model, self.env.data)
        self._flip = {c: camera_is_upside_down(self.env.model, self.env.data, c) for c in self.cameras}
        self.steps = 0
        self.render_images = bool(self.cameras)  # False: observations carry no images (faster)
        self._fast_render = fast_render
        self._sized_renderers: dict[int, mujoco.Renderer] = {}  # other sizes than image_size (videos)
        _OPEN_ENVS.add(self)

    @staticmethod
    def _unfreeze(env: Any) -> None:
        env._set_task_called = True  # we set positions ourselves; no pre-generated Task needed
        env._freeze_rand_vec = False  # draw a new random vector at every reset ...
        env.seeded_rand_vec = True  # ... from env.np_random, which reset() reseeds per episode
        # Show the goal in the 39-D observation, as MT1 does: some experts read it.
        env._partially_observable = False
        env.__dict__.pop("sawyer_observation_space", None)  # cached_property; recompute bounds

    @property
    def fps(self) -> int:
        """Control frequency in Hz (frame_skip * timestep = 12.5 ms: 80 Hz)."""
        return int(round(1.0 / self.env.dt))

    @property
    def max_path_length(self) -> int:
        """Meta-World's own horizon for the task (500)."""
        return int(self.env.max_path_length)

    @property
    def positions(self) -> np.ndarray:
        """The random vector (object/goal positions) of the current episode."""
        return np.array(self.env._last_rand_vec, copy=True)

    def reset(self, seed: int) -> dict[str, Any]:
        """Start an episode whose object/goal positions are drawn from `seed`."""
        self.env.seed(int(seed))
        raw, _ = self.env.reset()
        self.steps = 0
        return self._observe(raw)

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], bool]:
        """Apply one 4-D action (clipped to [-1, 1], as the env does); returns (obs, success)."""
        action = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        raw, _, _, _, info = self.env.step(action)
        self.steps += 1
        return self._observe(raw), bool(info["success"])

    def render(self) -> dict[str, np.ndarray]:
        """Upright RGB images of every camera: {"observation.images.<cam>": (H, W, 3) uint8}."""
        return {IMAGE_PREFIX + cam: self._frame(self.renderer, cam) for cam in self.cameras}

    def render_camera(self, camera: str, size: int) -> np.ndarray:
        """One upright RGB frame (size, size, 3) uint8 of `camera`, at a size other than the
        observations' (e.g. a video of a 64 px policy at 128 px); its renderer is made once."""
        if size not in self._sized_renderers:
            self._sized_renderers[size] = make_renderer(self.env.model, size, self._fast_render)
        return self._frame(self._sized_renderers[size], camera)

    def _frame(self, renderer: mujoco.Renderer, camera: str) -> np.ndarray:
        """`camera`'s current view through `renderer`, upright: (H, W, 3) uint8, a fresh array per call."""
        renderer.update_scene(self.env.data, camera=camera)
        img = renderer.render()
        if camera not in self._flip:
            self._flip[camera] = camera_is_upside_down(self.env.model, self.env.data, camera)
        return np.ascontiguousarray(img[::-1, ::-1]) if self._flip[camera] else img

    def _observe(self, raw: np.ndarray) -> dict[str, Any]:
        obs = {
            STATE_KEY: raw[:4].astype(np.float32),
            RAW_OBS_KEY: raw,
            ENV_TASK_KEY: self.task,
            TASK_KEY: instruction(self.task),
        }
        if self.render_images:
            obs.update(self.render())
        return obs

    def close(self) -> None:
        """Free the renderer's EGL context and the env; safe to call twice."""
        for renderer in [self.renderer, *self._sized_renderers.values()]:
            if renderer is not None:
                renderer.close()
        self.renderer, self._sized_renderers = None, {}
        if self.env is not None:
            self.env.close()
            self.env = None
        _OPEN_ENVS.discard(self)

    def __enter__(self) -> MetaWorldEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@functools.lru_cache(maxsize=1)  # once per process
def _load_triton_before_egl() -> None:
    # Measured here: creating an EGL context (Mesa llvmpipe loads its libLLVM) and *then*
    # importing torchvision (-> torch._dynamo -> triton's own LLVM in libtriton) segfaults on a
    # symbol clash; loading libtriton first (0.3 s) avoids it. Harmless where triton is absent.
    try:
        import triton._C.libtriton  # noqa: F401
    except ImportError:
        pass


@functools.lru_cache(maxsize=1)  # register once
def _register_exit_hook() -> None:
    # mujoco.egl registers eglTerminate(display) at exit when it creates its first context;
    # atexit runs hooks last-in first-out, so ours (registered after it) frees our contexts
    # while the display is still alive; freeing them later prints EGLError tracebacks.
    atexit.register(_close_open_envs)


def _close_open_envs() -> None:
    for env in list(_OPEN_ENVS):
        env.close()


class ScriptedExpert:
    """Meta-World's scripted policy for one task: `act(raw_obs) -> (4,) float32` in [-1, 1]."""

    def __init__(self, task: str) -> None:
        from metaworld.policies import ENV_POLICY_MAP

        if task not in ENV_POLICY_MAP:
            raise CraftVLAError(f"no scripted expert for task {task!r} in metaworld.policies.ENV_POLICY_MAP")
        self.policy = ENV_POLICY_MAP[task]()

    def act(self, raw_obs: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            # The experts' P-gains often exceed 1 and they warn each step; the env clips anyway.
            warnings.filterwarnings("ignore", message="Constant\\(s\\) may be too high")
            action = self.policy.get_action(raw_obs)
        return np.clip(action, -1.0, 1.0).astype(np.float32)
