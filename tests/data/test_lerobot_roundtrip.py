"""Write -> read round trips: exact vectors, images within codec tolerance, per-episode slices."""

from __future__ import annotations

import json

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from lerobot_synth import CAM, action, image, state, write_dataset

from craftvla.data import LeRobotDataset
from craftvla.data.video import pick_encoder

LENGTHS = [12, 9, 15, 6]


def _has(codec: str) -> bool:
    try:
        pick_encoder(codec)
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.parametrize(
    "codec", ["h264", pytest.param("av1", marks=pytest.mark.skipif(not _has("av1"), reason="no AV1 encoder"))]
)
def test_round_trip_exact_vectors_and_close_images(tmp_path, codec):
    root = write_dataset(tmp_path / "ds", [7, 5], codec=codec)
    ds = LeRobotDataset(root, chunk_size=3)
    assert len(ds) == 12 and ds.meta.total_episodes == 2 and ds.meta.tasks == ["task 0", "task 1"]
    info = json.loads((root / "meta/info.json").read_text())
    assert info["features"][CAM]["info"]["video.codec"] == codec
    errors = []
    for i in range(len(ds)):
        item = ds[i]
        ep, f = item["episode_index"], item["frame_index"]
        assert torch.equal(item["observation.state"], torch.from_numpy(state(ep, f)))
        assert torch.equal(item["action"][0], torch.from_numpy(action(ep, f)))
        img = item[CAM]
        assert img.shape == (3, 48, 64) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
        ref = torch.from_numpy(image(ep, f)).permute(2, 0, 1).float() / 255
        errors.append((img - ref).abs().mean().item())
    assert max(errors) < 0.03, errors


def test_episodes_share_one_parquet_and_one_mp4(dataset_root):
    episodes = pq.read_table(dataset_root / "meta/episodes/chunk-000/file-000.parquet").to_pydict()
    assert set(episodes["data/file_index"]) == {0} and set(episodes[f"videos/{CAM}/file_index"]) == {0}
    assert episodes[f"videos/{CAM}/from_timestamp"] == [0.0, 1.2, 2.1, 3.6]
    assert episodes[f"videos/{CAM}/to_timestamp"] == [1.2, 2.1, 3.6, 4.2]
    assert episodes["dataset_from_index"] == [0, 12, 21, 36]
    with av.open(str(dataset_root / f"videos/{CAM}/chunk-000/file-000.mp4")) as c:
        assert c.streams.video[0].frames == sum(LENGTHS)


def test_each_frame_comes_from_its_own_episode_slice(dataset_root):
    ds = LeRobotDataset(dataset_root, chunk_size=4)
    expected = [(ep, f) for ep, n in enumerate(LENGTHS) for f in range(n)]
    for i in np.random.default_rng(0).permutation(len(ds)):  # random order exercises the cache
        item = ds[int(i)]
        ep, f = expected[i]
        assert (item["index"], item["episode_index"], item["frame_index"]) == (i, ep, f)
        assert item["task"] == f"task {ep % 2}"
        assert item["timestamp"] == pytest.approx(f / 10)
        red, green = item[CAM][0].mean().item() * 255, item[CAM][1].mean().item() * 255
        assert abs(red - (20 + 40 * ep)) < 4 and abs(green - 8 * f) < 4, (i, red, green)
    assert ds.frames.decoded_slices == len(LENGTHS)  # each episode decoded once, then cached


def test_action_chunk_padding_at_episode_end(dataset_root):
    ds = LeRobotDataset(dataset_root, chunk_size=5)
    item = ds[21 - 3]  # episode 1 (indices 12..20), frame 6 of 9: frames 6, 7, 8 then padding
    assert item["episode_index"] == 1 and item["frame_index"] == 6
    assert item["action_is_pad"].tolist() == [False, False, False, True, True]
    expected = np.stack([action(1, f) for f in (6, 7, 8, 8, 8)])  # pads repeat the last action
    assert torch.equal(item["action"], torch.from_numpy(expected))
    first = ds[0]
    assert not first["action_is_pad"].any()
    assert first["action"][:, 0].tolist() == [0, 1, 2, 3, 4]
    last = ds[len(ds) - 1]  # last frame of the dataset: only the current action is real
    assert last["action_is_pad"].tolist() == [False] + [True] * 4


def test_stats_match_numpy(dataset_root):
    ds = LeRobotDataset(dataset_root)
    acts = np.stack([action(ep, f) for ep, n in enumerate(LENGTHS) for f in range(n)]).astype(np.float64)
    st = ds.stats["action"]
    np.testing.assert_allclose(st["mean"], acts.mean(0), rtol=1e-6)
    np.testing.assert_allclose(st["std"], acts.std(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(st["min"], acts.min(0))
    np.testing.assert_allclose(st["max"], acts.max(0))
    np.testing.assert_allclose(st["q01"], np.quantile(acts, 0.01, axis=0), rtol=1e-5)
    np.testing.assert_allclose(st["q99"], np.quantile(acts, 0.99, axis=0), rtol=1e-5)
    assert st["count"].tolist() == [sum(LENGTHS)]
    # images: per-channel over all (every frame is sampled for episodes < 100 frames), in [0, 1]
    imgs = np.stack([image(ep, f) for ep, n in enumerate(LENGTHS) for f in range(n)]) / 255.0
    img = ds.stats[CAM]
    assert img["mean"].shape == (3, 1, 1)
    np.testing.assert_allclose(img["mean"].reshape(3), imgs.mean((0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(img["std"].reshape(3), imgs.std((0, 1, 2)), rtol=1e-4)
    np.testing.assert_allclose(img["max"].reshape(3), imgs.max((0, 1, 2)), rtol=1e-6)


def test_file_size_limits_roll_files_and_chunks(tmp_path):
    # tiny limits: every episode gets its own data file and mp4; chunks_size=2 -> chunk-001 too.
    # Episodes are longer than the encoders' lookahead (packets lag the frames by up to ~20).
    lengths = [30, 25, 28]
    root = write_dataset(
        tmp_path / "ds", lengths, data_files_size_in_mb=1e-4, video_files_size_in_mb=1e-6, chunks_size=2
    )
    assert sorted(p.relative_to(root).as_posix() for p in root.glob("data/*/*.parquet")) == [
        "data/chunk-000/file-000.parquet",
        "data/chunk-000/file-001.parquet",
        "data/chunk-001/file-000.parquet",
    ]
    assert len(list(root.glob(f"videos/{CAM}/*/*.mp4"))) == 3
    ds = LeRobotDataset(root, chunk_size=2)
    for i, (ep, f) in enumerate([(e, f) for e, n in enumerate(lengths) for f in range(n)]):
        item = ds[i]
        assert (item["episode_index"], item["frame_index"]) == (ep, f)
        assert abs(item[CAM][0].mean().item() * 255 - (20 + 40 * ep)) < 4
