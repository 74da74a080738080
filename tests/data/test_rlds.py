"""RLDS in: the reader and `craftvla convert rlds` against a fixture the real tensorflow-datasets
wrote (fixtures/rlds/make_fixture.py), and the values TFDS itself read back from it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from craftvla.data import LeRobotDataset
from craftvla.data.convert import RldsConvertConfig, convert_rlds, feature_mapping, main
from craftvla.data.rlds import RldsDataset, read_records
from craftvla.errors import ConfigError, CraftVLAError

FIXTURE = Path(__file__).parent / "fixtures" / "rlds"
SRC = FIXTURE / "craftvla_rlds_fixture" / "1.0.0"
READBACK = np.load(FIXTURE / "readback.npz", allow_pickle=False)
META = json.loads((FIXTURE / "readback.json").read_text())["episodes"]


def _tfds_episode(length: int) -> tuple[int, dict]:
    """The TFDS read-back episode of this length (the fixture's lengths are distinct)."""
    (index,) = [i for i, m in enumerate(META) if m["length"] == length]
    return index, META[index]


def test_reader_equals_what_tfds_read_back():
    dataset = RldsDataset(SRC)
    assert dataset.num_episodes("train") == 4 and len(dataset.shards("train")) == 2
    assert dataset.features["steps/observation/image"].encoding == "jpeg"
    seen = []
    for episode in dataset.episodes("train"):
        i, meta = _tfds_episode(len(episode["steps/action"]))
        seen.append(i)
        assert episode["episode_metadata/file_path"] == [meta["file_path"]]
        assert sorted(set(episode["steps/language_instruction"])) == meta["instructions"]
        for key, name in (
            ("steps/action", "action"),
            ("steps/observation/state", "state"),
            ("steps/is_first", "is_first"),
            ("steps/is_last", "is_last"),
            ("steps/is_terminal", "is_terminal"),
            ("steps/observation/wrist_image", "wrist_image"),
        ):
            np.testing.assert_array_equal(episode[key], READBACK[f"ep{i}_{name}"], err_msg=key)  # exact (PNG: lossless)
        jpeg = np.abs(episode["steps/observation/image"].astype(int) - READBACK[f"ep{i}_image"])
        # TF decodes JPEG with its fast integer IDCT, Pillow with the accurate one: measured mean 0.37-0.48, max 9
        assert jpeg.mean() < 1.0 and jpeg.max() <= 12
    assert sorted(seen) == [0, 1, 2, 3]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("rlds") / "libero"
    result = convert_rlds(RldsConvertConfig(src=str(SRC), out=str(out), fps=20, robot_type="franka", progress=False))
    return out, result


def test_converted_dataset_carries_tfds_values(converted):
    out, result = converted
    assert result == {"episodes": 4, "frames": 36, "out": str(out)}
    ds = LeRobotDataset(out, chunk_size=1)
    assert ds.meta.fps == 20 and ds.meta.camera_keys == ["observation.images.image", "observation.images.wrist_image"]
    starts = [i for i in range(len(ds)) if ds[i]["frame_index"] == 0] + [len(ds)]
    for start, end in zip(starts, starts[1:]):
        i, meta = _tfds_episode(end - start)
        items = [ds[j] for j in range(start, end)]
        np.testing.assert_array_equal(np.stack([it["action"][0].numpy() for it in items]), READBACK[f"ep{i}_action"])
        np.testing.assert_array_equal(
            np.stack([it["observation.state"].numpy() for it in items]), READBACK[f"ep{i}_state"]
        )
        assert sorted({it["task"] for it in items}) == meta["instructions"]
        for key, name in (("observation.images.image", "image"), ("observation.images.wrist_image", "wrist_image")):
            ours = np.stack([it[key].permute(1, 2, 0).numpy() for it in items]) * 255  # (T, H, W, 3)
            theirs = READBACK[f"ep{i}_{name}"].astype(np.float32)
            err = np.abs(ours - theirs).mean()
            # h264 (4:2:0) error in levels, measured 1.7-2.4 on the smooth camera image and 6.4-6.8 on the
            # wrist image's saturated random 8-px colour blocks (chroma subsampling)
            assert err < {"image": 4.0, "wrist_image": 10.0}[name], (key, err)
            assert np.abs(ours - theirs[:, ::-1]).mean() > 5 * err  # not upside down (measured > 10x)


def test_mapping_defaults_and_overrides():
    features = RldsDataset(SRC).features
    assert feature_mapping(features) == {
        "steps/observation/image": "observation.images.image",
        "steps/observation/wrist_image": "observation.images.wrist_image",
        "steps/observation/state": "observation.state",
        "steps/action": "action",
        "steps/language_instruction": "task",
    }
    custom = feature_mapping(
        features, "observation.image=observation.images.main,observation/wrist_image=observation.images.wrist"
    )
    assert custom["steps/observation/image"] == "observation.images.main"
    assert custom["steps/observation/wrist_image"] == "observation.images.wrist"
    with pytest.raises(CraftVLAError, match="'observation.depth' not found.*steps/observation/image"):
        feature_mapping(features, "observation.depth=observation.images.depth")
    with pytest.raises(CraftVLAError, match="images map to"):
        feature_mapping(features, "observation/state=observation.images.state")
    with pytest.raises(ConfigError, match="RLDS_KEY=LEROBOT_KEY"):
        feature_mapping(features, "observation/state")


def _copy(tmp_path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(SRC, dst)
    return dst


def test_a_damaged_shard_is_one_clear_error_naming_it(tmp_path):
    src = _copy(tmp_path)
    shard = src / "craftvla_rlds_fixture-train.tfrecord-00001-of-00002"
    original = shard.read_bytes()
    data = bytearray(original)
    data[200] ^= 0xFF  # inside the first record's payload
    shard.write_bytes(bytes(data))
    with pytest.raises(CraftVLAError, match="00001-of-00002: record 0: data CRC mismatch"):
        list(RldsDataset(src).episodes("train"))
    shard.write_bytes(original[:-10])
    with pytest.raises(CraftVLAError, match="00001-of-00002: record 1 truncated"):
        list(read_records(shard))
    shard.unlink()
    with pytest.raises(CraftVLAError, match="missing shard.*00001-of-00002"):
        RldsDataset(src).shards("train")


def test_cli_errors_exit_nonzero_and_leave_nothing(tmp_path, capsys):
    from craftvla.cli import main as cli

    src = _copy(tmp_path)
    (src / "features.json").write_text("{ not json")
    out = tmp_path / "out"
    assert cli(["convert", "rlds", "--src", str(src), "--out", str(out)]) == 1
    assert "features.json" in capsys.readouterr().err and not out.exists()
    (out / "keep").mkdir(parents=True)
    assert cli(["convert", "rlds", "--src", str(SRC), "--out", str(out), "--progress", "false"]) == 1
    assert "not empty" in capsys.readouterr().err and [p.name for p in out.iterdir()] == ["keep"]
    assert (
        cli(
            [
                "convert",
                "rlds",
                "--src",
                str(SRC),
                "--out",
                str(tmp_path / "ok"),
                "--map",
                "observation/nothing=action",
                "--progress",
                "false",
            ]
        )
        == 1
    )
    assert "not found" in capsys.readouterr().err and not (tmp_path / "ok").exists()
    assert (
        main(["rlds", "--src", str(SRC), "--out", str(tmp_path / "two"), "--max_episodes", "2", "--progress", "false"])
        == 0
    )
    assert LeRobotDataset(tmp_path / "two", chunk_size=1).meta.total_episodes == 2


def test_a_feature_the_records_lack_names_the_shard(tmp_path):
    src = _copy(tmp_path)
    tree = json.loads((src / "features.json").read_text())
    observation = tree["featuresDict"]["features"]["steps"]["sequence"]["feature"]["featuresDict"]["features"][
        "observation"
    ]
    observation["featuresDict"]["features"]["depth"] = {
        "pythonClassName": "tensorflow_datasets.core.features.tensor_feature.Tensor",
        "tensor": {"dtype": "float32", "encoding": "none", "shape": {"dimensions": ["4"]}},
    }
    (src / "features.json").write_text(json.dumps(tree))
    with pytest.raises(CraftVLAError, match="00000-of-00002: record lacks feature 'steps/observation/depth'"):
        convert_rlds(
            RldsConvertConfig(
                src=str(src), out=str(tmp_path / "out"), progress=False, map="observation/depth=observation.depth"
            )
        )
    assert not (tmp_path / "out").exists()
