"""Env construction: fresh seeded positions, the state layout, upright cameras, clean errors and exit."""

import subprocess
import sys

import mujoco
import numpy as np
import pytest

from craftvla.errors import CraftVLAError
from craftvla.keys import IMAGE_PREFIX, RAW_OBS_KEY, STATE_KEY
from craftvla.sim.metaworld import (
    COLLECT_STREAM,
    EVAL_STREAM,
    MetaWorldEnv,
    camera_is_upside_down,
    camera_names,
    episode_seed,
    instruction,
    make_renderer,
    parse_tasks,
)
from tests.launch import CHILD_TIMEOUT_S

TASK = "drawer-close-v3"


def test_positions_fresh_per_episode_reproducible_and_streams_disjoint():
    with MetaWorldEnv(TASK, cameras=()) as env:
        seeds = [episode_seed(0, COLLECT_STREAM, TASK, i) for i in range(3)]
        positions = []
        for s in seeds:
            env.reset(s)
            positions.append(env.positions)
        env.reset(seeds[1])
        again = env.positions
        env.reset(episode_seed(0, EVAL_STREAM, TASK, 1))
        eval_pos = env.positions
    assert not np.allclose(positions[0], positions[1]) and not np.allclose(positions[1], positions[2])
    np.testing.assert_array_equal(again, positions[1])  # same seed -> same positions
    assert all(not np.allclose(eval_pos, p) for p in positions)  # evaluation never reuses them
    assert episode_seed(0, COLLECT_STREAM, TASK, 0) != episode_seed(0, COLLECT_STREAM, "door-open-v3", 0)


def test_state_is_end_effector_xyz_and_gripper():
    with MetaWorldEnv(TASK, cameras=()) as env:
        obs = env.reset(1)
        obs, _ = env.step(np.array([0.5, 0.0, -0.5, 1.0]))
        np.testing.assert_allclose(obs[STATE_KEY][:3], env.env.get_endeff_pos(), atol=1e-6)
        np.testing.assert_array_equal(obs[STATE_KEY], obs[RAW_OBS_KEY][:4].astype(np.float32))
        assert 0.0 <= obs[STATE_KEY][3] <= 1.0  # normalised gripper opening
        assert obs[STATE_KEY].dtype == np.float32 and not any(k.startswith(IMAGE_PREFIX) for k in obs)


def _project(model, data, camera, point, size):
    """Pixel (row, col) of a world point in the camera's raw (un-rotated) render; pinhole model."""
    cid = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
    rot = data.cam_xmat[cid].reshape(3, 3)
    c = rot.T @ (point - data.cam_xpos[cid])  # camera frame: x right, y up, looking along -z
    f = 0.5 * size / np.tan(np.deg2rad(model.cam_fovy[cid]) / 2)
    return size / 2 - f * c[1] / -c[2], size / 2 + f * c[0] / -c[2]


def test_corner2_is_rotated_upright_and_every_offered_camera_points_up():
    size = 64
    with MetaWorldEnv(TASK, image_size=size, cameras=("corner2", "corner", "topview")) as env:
        obs = env.reset(3)
        raw_renderer = make_renderer(env.env.model, size)
        try:
            raw_renderer.update_scene(env.env.data, camera="corner2")
            raw = raw_renderer.render()
        finally:
            raw_renderer.close()
        np.testing.assert_array_equal(obs[IMAGE_PREFIX + "corner2"], raw[::-1, ::-1])  # rotated 180 degrees
        assert (
            obs[IMAGE_PREFIX + "corner2"].shape == (size, size, 3) and obs[IMAGE_PREFIX + "corner2"].dtype == np.uint8
        )
        model, data = env.env.model, env.env.data
        hand = env.env.get_endeff_pos().copy()
        for cam in camera_names():
            if cam in ("behindGripper", "gripperPOV"):
                continue  # move with the hand
            flip = camera_is_upside_down(model, data, cam)
            (r_low, _), (r_high, _) = (_project(model, data, cam, p, size) for p in (hand, hand + [0, 0, 0.3]))
            if flip:
                r_low, r_high = size - r_low, size - r_high
            assert r_high < r_low, f"{cam}: a point above the hand appears below it"
        assert camera_is_upside_down(model, data, "corner2") and not camera_is_upside_down(model, data, "topview")


def test_bad_task_names_the_task_and_lists_valid_ones():
    with pytest.raises(CraftVLAError) as err:
        parse_tasks("drawer-close-v3,drawer-shut-v3")
    assert "drawer-shut-v3" in str(err.value) and "door-open-v3" in str(err.value)
    assert parse_tasks(" drawer-close-v3 , door-open-v3") == ["drawer-close-v3", "door-open-v3"]
    assert instruction("drawer-close-v3") == "close the drawer"


@pytest.mark.parametrize("verb", ["collect", "eval"])
def test_cli_bad_task_is_one_line_and_writes_nothing(verb, tmp_path, capsys):
    from craftvla.cli import main

    out = tmp_path / "out"
    extra = ["--policy", "expert"] if verb == "eval" else []
    assert main([verb, "--tasks", "drawer-close-v3,nope-v3", "--out", str(out), *extra]) == 1
    err = capsys.readouterr().err
    assert "nope-v3" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


SCRIPT = """
import os
os.environ["MUJOCO_GL"] = "egl"
from craftvla.sim.metaworld import MetaWorldEnv
with MetaWorldEnv("drawer-close-v3", cameras=("corner", "corner2")) as env:
    env.reset(0)
leaked = MetaWorldEnv("button-press-topdown-v3", cameras=("corner",))  # never closed: atexit does it
leaked.reset(0)
import torchvision  # after an EGL context: segfaulted (Mesa's vs triton's LLVM) unless triton loads first
print("ok")
"""


def test_no_egl_error_noise_at_exit_and_torch_imports_after_rendering():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    assert "EGLError" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
