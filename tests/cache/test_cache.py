"""Anchor caches: build / load round trips, detection, refusal, interruption, training, exactness."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from craftvla.craft import cache as C
from craftvla.craft import cache_build as B
from craftvla.craft.config import CraftConfig
from craftvla.craft.plugin import CraftPlugin
from craftvla.craft.providers import CacheAnchors
from craftvla.craft.targets import Extraction
from craftvla.errors import CraftVLAError
from craftvla.model.context import bridge_features

from .conftest import CAM

NUM_LAYERS, WIDTH, N_VIS, T_MAX, N_QUERY = 3, 64, 16, 40, 4
L_MAX = 1 + N_VIS + T_MAX + N_QUERY + 1
N_VECS = {"vision": N_VIS, "all": L_MAX, "text": T_MAX, "last": 1}
# Every token set and every dtype on both hidden-state targets (max pooling once); actions reads neither.
ROUND_TRIPS = [("actions", None, None, "float16")] + [
    (target, anchor_type, pooling, dtype)
    for target in ("tokens", "pooled")
    for anchor_type, dtype in zip(N_VECS, ("float16", "bfloat16", "float32", "bfloat16"))
    for pooling in ((None,) if target == "tokens" else ("mean", "max") if anchor_type == "text" else ("mean",))
]


def _policy(checkpoint):
    from craftvla.model.policy import VLAPolicy

    return VLAPolicy.from_pretrained(checkpoint).eval()


def _all_samples(cache: C.AnchorCache) -> dict:
    return cache.samples(list(range(len(cache))))


@pytest.mark.parametrize("target,anchor_type,pooling,dtype", ROUND_TRIPS)
def test_round_trip_shapes_dtypes_meta(build, target, anchor_type, pooling, dtype):
    path = build(target=target, anchor_type=anchor_type, pooling=pooling, dtype=dtype, num_samples=5, shard_size=2)
    cache = C.AnchorCache(path)
    meta = cache.meta
    assert cache.target == meta["target"] == target and len(cache) == 5 and len(cache.files) == 3
    assert meta["format"] == 2 and meta["dtype"] == dtype and meta["shard_size"] == 2
    assert len(meta["model_fingerprint"]) == 64
    if target == "actions":  # reads no hidden state: nothing recorded that it does not use
        assert (meta["layers"], meta["anchor_type"], meta["pooling"], meta["feature_width"]) == (None,) * 4
    else:  # default layer: CRaFT's default anchor layer, the middle one (3 // 2); default pooling: mean
        want_pooling = (pooling or "mean") if target == "pooled" else None
        assert (meta["layers"], meta["anchor_type"], meta["pooling"]) == ([1], anchor_type, want_pooling)
        assert meta["feature_width"] == WIDTH
    batch = _all_samples(cache)
    assert batch[CAM].shape == (5, 3, 32, 32) and batch[CAM].dtype == torch.float32
    assert 0 <= batch[CAM].min() and batch[CAM].max() <= 1
    assert batch["input_ids"].shape == (5, T_MAX) and batch["attention_mask"].dtype == torch.bool
    assert len(batch["task"]) == 5 and batch["observation.state"].shape == (5, 4)
    target_values = batch[C.target_key(target)]
    dtype = B.DTYPES[dtype]
    if target == "tokens":
        assert target_values.shape == (5, 1, N_VECS[anchor_type], WIDTH) and target_values.dtype == dtype
        assert batch[C.TOKEN_MASK_KEY].shape == (5, N_VECS[anchor_type])
    elif target == "pooled":
        assert target_values.shape == (5, WIDTH) and target_values.dtype == dtype
    else:
        assert target_values.shape == (5, 4, 4) and target_values.dtype == dtype  # (H, A) of the small config


def test_target_comes_from_the_shard_keys(build, tmp_path):
    path = build(target="tokens", dtype="float16", num_samples=5, shard_size=2)
    copy = shutil.copytree(path, tmp_path / "c")
    assert C.AnchorCache(copy).target == "tokens"
    _edit_meta(copy, lambda m: m.update(target="pooled"))
    with pytest.raises(
        CraftVLAError,
        match="target is 'pooled' in the cache but the student extracts 'tokens'.*meta.json vs the shard's keys",
    ):
        C.AnchorCache(copy)


def test_format_1_caches_are_refused_with_a_rebuild_request(build, tmp_path):
    copy = shutil.copytree(build(target="pooled", dtype="float16", num_samples=5, shard_size=2), tmp_path / "c")
    _edit_meta(copy, lambda m: m.update(format=1, cache_type="hidden_feature"))
    with pytest.raises(
        CraftVLAError,
        match=r"meta.json: anchor-cache format 1; this craftvla reads format 2 "
        r"\(built by an older craftvla: rebuild it with `craftvla cache build`\)",
    ):
        C.AnchorCache(copy)


@pytest.mark.parametrize(
    "field,change,message",
    [
        ("layers", (2,), r"layers is \(1,\) in the cache but the student extracts \(2,\).*craft.anchor_layer_idx"),
        ("anchor_type", "all", "anchor type is 'vision' in the cache but the student extracts 'all'"),
        ("pooling", "max", "pooling is 'mean' in the cache but the student extracts 'max'.*leave craft.pooling unset"),
        ("target", "tokens", "target is 'pooled' in the cache but the student extracts 'tokens'"),
        ("width", 128, "feature width is 64 in the cache but the student extracts 128"),
        ("fingerprint", "f" * 64, "model fingerprint is '[0-9a-f]{64}' in the cache but the student extracts 'f{64}'"),
    ],
)
def test_mismatch_refused(build, checkpoint, field, change, message):
    path = build(target="pooled", dtype="float16", num_samples=5, shard_size=2)
    cache = C.AnchorCache(path)
    good = dict(
        student=Extraction("pooled", (1,), "vision", "mean"),
        width=WIDTH,
        fingerprint=C.model_fingerprint(_policy(checkpoint)),
    )
    cache.check(**good)  # the matching student passes
    if field in ("width", "fingerprint"):
        bad = {**good, field: change}
    else:
        bad = {**good, "student": Extraction(**{**good["student"].__dict__, field: change})}
    with pytest.raises(CraftVLAError, match=message):
        cache.check(**bad)


def test_craft_adopts_the_cache_settings_left_unset(build, checkpoint, caplog):
    """`cache build` defaults + `--craft.anchor_cache DIR` alone: layer, pooling and feature type
    come from the cache (and are logged); the provider reproduces the cached targets."""
    path = build(
        target="pooled", anchor_type="text", pooling="max", dtype="float32", layer=2, num_samples=4, shard_size=2
    )
    policy = _policy(checkpoint)
    cfg = CraftConfig(enabled=True, anchor_cache=str(path), anchor_batch_size=4)
    assert cfg.source == "cache" and cfg.anchor_type is None and cfg.pooling is None
    with caplog.at_level("INFO", logger="craftvla.craft.providers"):
        provider = CacheAnchors(policy, cfg, batch_size=cfg.anchor_batch_size)
    assert "craft.targets=pooled, craft.anchor_layer_idx=2, craft.anchor_type=text, craft.pooling=max" in caplog.text
    with torch.no_grad():
        ((student, target),) = provider.retention_pairs(policy, None, None).values()
    assert student.shape == target.shape == (4, WIDTH)
    torch.testing.assert_close(student, target, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "flags,message",
    [
        (
            dict(anchor_layer_idx=2),
            r"layers is \(1,\) in the cache but the student extracts \(2,\).*leave "
            r"craft.anchor_layer_idx unset",
        ),
        (dict(pooling="max"), "pooling is 'mean' in the cache but the student extracts 'max'"),
        (dict(anchor_type="both"), "anchor type is 'vision' in the cache but the student extracts 'both'"),
        (dict(targets="pooled,actions"), "target is 'pooled' in the cache but the student extracts 'pooled,actions'"),
    ],
)
def test_craft_flags_set_against_the_cache_are_refused(build, checkpoint, flags, message):
    path = build(target="pooled", dtype="float16", num_samples=5, shard_size=2)
    with pytest.raises(CraftVLAError, match=message):
        CraftPlugin(_policy(checkpoint), CraftConfig(enabled=True, anchor_cache=str(path), **flags))


def test_cache_source_flags_conflict():
    from craftvla.errors import ConfigError

    with pytest.raises(ConfigError, match="craft.anchor_source='online': conflicts with craft.anchor_cache"):
        CraftConfig(enabled=True, anchor_source="online", anchor_cache="some/dir")
    with pytest.raises(ConfigError, match="craft.anchor_cache=None: craft.anchor_source='cache' needs"):
        CraftConfig(enabled=True, anchor_source="cache")


def _shards(path) -> dict:
    from safetensors.torch import load_file

    return {f.name: load_file(str(f)) for f in sorted(path.glob("shard-*.safetensors"))}


def test_interrupted_build_resumes_to_the_same_cache(build, checkpoint, anchor_dataset, tmp_path, monkeypatch):
    flags = dict(target="pooled", anchor_type="text", dtype="float32", num_samples=9, shard_size=4)
    cfg = B.CacheBuildConfig(
        checkpoint=str(checkpoint),
        dataset=str(anchor_dataset),
        out=str(tmp_path / "c"),
        batch_size=4,
        device="cpu",
        **flags,
    )
    real_save = B.save_file
    calls = []

    def crash_mid_write(tensors, filename, metadata=None):  # 2nd shard: half a file, then die
        calls.append(filename)
        if len(calls) == 2:
            (tmp_path / "c" / filename.split("/")[-1]).write_bytes(b"\0" * 100)
            raise KeyboardInterrupt("killed mid-write")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(B, "save_file", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        B.build_cache(cfg)
    out = tmp_path / "c"
    assert not (out / "meta.json").exists()
    assert [f.name for f in out.glob("shard-*")] == ["shard-00000.safetensors"]  # the torn one is not visible
    with pytest.raises(CraftVLAError, match="interrupted build"):
        C.AnchorCache(out)
    monkeypatch.setattr(B, "save_file", real_save)
    first = (out / "shard-00000.safetensors").stat().st_mtime_ns
    B.build_cache(cfg)  # resumes
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == first  # kept, not rebuilt
    assert not list(out.glob(".*.tmp*"))
    reference = build(**flags)
    assert json.loads((out / "meta.json").read_text()) | {"out": 0} == json.loads(
        (reference / "meta.json").read_text()
    ) | {"out": 0}
    got, want = _shards(out), _shards(reference)
    assert got.keys() == want.keys() and len(got) == 3
    for name in want:
        assert all(torch.equal(got[name][k], want[name][k]) for k in want[name])


def test_interrupted_build_before_any_shard(checkpoint, anchor_dataset, tmp_path, monkeypatch):
    cfg = B.CacheBuildConfig(
        checkpoint=str(checkpoint),
        dataset=str(anchor_dataset),
        out=str(tmp_path / "c"),
        target="pooled",
        num_samples=4,
        shard_size=2,
        device="cpu",
    )
    real_write = B._write_shard

    def die_after_one(path, tensors, tasks):
        if list(path.parent.glob("shard-*")):
            raise RuntimeError("simulated interruption after 1 shard")
        real_write(path, tensors, tasks)

    monkeypatch.setattr(B, "_write_shard", die_after_one)
    with pytest.raises(RuntimeError, match="simulated"):
        B.build_cache(cfg)
    monkeypatch.setattr(B, "_write_shard", real_write)
    changed = B.CacheBuildConfig(**{**cfg.__dict__, "anchor_type": "last"})
    with pytest.raises(CraftVLAError, match=r"other settings \(\['anchor_type'\]\).*--overwrite true"):
        B.build_cache(changed)
    B.build_cache(B.CacheBuildConfig(**{**changed.__dict__, "overwrite": True}))
    assert C.AnchorCache(tmp_path / "c").meta["anchor_type"] == "last"
    with pytest.raises(CraftVLAError, match="already a complete cache"):
        B.build_cache(changed)


def test_loader_cycles_and_reshuffles(build):
    cache = C.AnchorCache(build(target="pooled", dtype="float16", num_samples=5, shard_size=2))
    orders = [cache.epoch_order(e, seed=3) for e in range(4)]
    assert all(sorted(o) == list(range(5)) for o in orders) and len({tuple(o) for o in orders}) > 1
    ids = {tuple(s.tolist()): i for i, s in enumerate(_all_samples(cache)["observation.state"])}
    stream = cache.batches(batch_size=3, seed=3)
    seen = [ids[tuple(s.tolist())] for _ in range(5) for s in next(stream)["observation.state"]]
    assert seen == sum(orders, [])[:15]  # 3 epochs' worth, epoch after epoch, without end
    again = cache.batches(batch_size=3, seed=3)
    assert torch.equal(next(again)["target.pooled"], next(cache.batches(3, seed=3))["target.pooled"])


def _online_features(policy, batch, layer):
    """What helper CRaFT's online provider computes: C_R mean-pooled at `layer` (anchor_type vision)."""
    from craftvla.craft.providers import OnlineAnchors

    feature_fn = lambda context: {"pooled": bridge_features(context, layer, pooling="mean", anchor_type="vision")}
    return OnlineAnchors(policy, feature_fn).features(policy, batch)["pooled"]


def _dataset_batch(checkpoint, anchor_dataset, cache):
    """The same samples straight from the anchor dataset (not the cache's stored copies)."""
    from craftvla.craft.data import open_anchor_dataset

    policy = _policy(checkpoint)
    dataset = open_anchor_dataset(str(anchor_dataset), policy)
    indices = json.loads((cache.path / "build.json").read_text())["indices"]
    items = [dataset[i] for i in indices]
    return policy, {
        CAM: torch.stack([it[CAM] for it in items]),
        "task": [it["task"] for it in items],
        "observation.state": torch.stack([it["observation.state"] for it in items]),
    }


@pytest.mark.parametrize("dtype,image_dtype,rtol", [("float32", "float32", 1e-5), ("float16", "float16", 2e-3)])
def test_cache_targets_equal_online_anchors(build, checkpoint, anchor_dataset, dtype, image_dtype, rtol):
    cache = C.AnchorCache(build(target="pooled", dtype=dtype, image_dtype=image_dtype, num_samples=6, shard_size=4))
    policy, batch = _dataset_batch(checkpoint, anchor_dataset, cache)
    online = _online_features(policy, batch, layer=1)  # (6, D); the default layer: 3 // 2 = index 1
    cached = _all_samples(cache)["target.pooled"].float()
    scale = online.abs().max()
    assert (cached - online).abs().max() <= rtol * scale


def test_padded_token_sets_match_per_sample_forward(build, checkpoint):
    """tokens targets over every real token do not depend on the other instructions of the batch."""
    cache = C.AnchorCache(
        build(target="tokens", anchor_type="all", dtype="float32", image_dtype="float32", num_samples=12, shard_size=12)
    )
    policy, batch = _policy(checkpoint), _all_samples(cache)
    assert len({int(m.sum()) for m in batch["attention_mask"]}) == 3  # three instruction lengths
    with torch.no_grad():
        for i in range(0, 12, 5):
            one = {k: (v[i : i + 1] if torch.is_tensor(v) else v[i : i + 1]) for k, v in batch.items()}
            context = policy.encode(one)  # batch of one: no text padding at all
            states, mask = cache.extraction(policy, context, cache.meta["max_text_tokens"])
            assert torch.equal(mask, batch[C.TOKEN_MASK_KEY][i : i + 1])
            torch.testing.assert_close(states, batch["target.tokens"][i : i + 1], rtol=1e-5, atol=1e-5)


def _perturb(policy, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5 * (p.std() if p.numel() > 1 else 1))


@pytest.mark.parametrize("target", ["pooled", "tokens", "actions"])
def test_training_on_the_cache_lowers_the_retention_loss(build, checkpoint, target):
    from craftvla.craft.functional import retention_loss
    from craftvla.craft.providers import make_anchor_provider

    path = build(target=target, dtype="float32", num_samples=8, shard_size=4)
    policy = _policy(checkpoint).train()
    cfg = CraftConfig(
        enabled=True,
        anchor_source="cache",
        anchor_cache=str(path),
        anchor_type=None if target == "actions" else "vision",
        anchor_batch_size=4,
        anchor_layer_idx=None if target == "actions" else 1,
    )
    feature_fn = lambda context: {"pooled": bridge_features(context, 1, pooling="mean", anchor_type="vision")}
    # pooled: MSE of the pooled feature; tokens: per-token MSE over the cached states
    provider = make_anchor_provider(policy, cfg, feature_fn)
    pair = lambda: next(iter(provider.retention_pairs(policy, None, None).values()))  # noqa: E731
    with torch.no_grad():
        start = retention_loss(*pair()).item()
    assert start < 1e-8  # the unchanged teacher reproduces its own targets
    _perturb(policy)
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = retention_loss(*pair())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 1e-4
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_craft_train_run_reads_the_cache(build, checkpoint, anchor_dataset, tmp_path):
    """`craftvla train --craft.anchor_source cache`: the student starts as the cache's teacher."""
    from craftvla.train.config import parse_train_config
    from craftvla.train.loop import train
    from craftvla.train.metrics import read_metrics

    path = build(dtype="float32", image_dtype="float32", num_samples=8, shard_size=4)  # the build defaults
    assert json.loads((path / "meta.json").read_text())["target"] == "actions"  # the target that retains
    run = tmp_path / "run"
    # no --craft.anchor_source / anchor_type / pooling / anchor_layer_idx: adopted from the cache
    # the policy is the checkpoint's (no architecture flags: they would be refused)
    result = train(
        parse_train_config(
            [
                "--output_dir",
                str(run),
                "--log.progress",
                "false",
                "--log.plots",
                "false",
                "--init_from",
                str(checkpoint),
                "--dataset.root",
                str(anchor_dataset),
                "--steps",
                "5",
                "--batch_size",
                "4",
                "--optim.lr",
                "1e-2",
                "--log.log_freq",
                "1",
                "--craft.enabled",
                "true",
                "--craft.anchor_cache",
                str(path),
                "--craft.anchor_batch_size",
                "4",
            ]
        )
    )
    records = read_metrics(run / "metrics.jsonl")
    assert result.grad_plugin.targets == ["actions"]  # adopted from the default cache
    assert records[0]["craft/retention_loss"] < 1e-10  # the cache's targets are the initial model's own
    assert records[-1]["craft/retention_loss"] > 1e-6  # the task steps moved the features; the cache sees it


def test_cli_build_and_errors(checkpoint, anchor_dataset, tmp_path, capsys):
    from craftvla.cli import main

    out = tmp_path / "c"
    args = [
        "cache",
        "build",
        "--checkpoint",
        str(checkpoint),
        "--dataset",
        str(anchor_dataset),
        "--out",
        str(out),
        "--target",
        "pooled",
        "--layer",
        "-1",
        "--dtype",
        "bfloat16",
        "--num_samples",
        "3",
        "--shard_size",
        "2",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    assert C.AnchorCache(out).meta["layers"] == [3]
    assert main(args) == 1 and "already a complete cache" in capsys.readouterr().err
    assert main(["cache", "build", "--target", "logits"]) == 1
    assert (
        main(["cache", "bulid"]) == 2 and "unknown sub-verb 'bulid'" in capsys.readouterr().err
    )  # a usage error, as an unknown verb
    assert (
        main(
            [
                "cache",
                "build",
                "--checkpoint",
                str(checkpoint),
                "--dataset",
                str(anchor_dataset),
                "--out",
                str(tmp_path / "d"),
                "--target",
                "pooled",
                "--layer",
                "7",
            ]
        )
        == 1
    )
    assert "layer=7: the model has hidden_states[0..3]" in capsys.readouterr().err
    assert main(["cache", "build", "--layer", "2"]) == 1  # the default target, actions, reads no layer
    assert "layer=2: a cache of the actions target does not read it (drop the flag)" in capsys.readouterr().err


def test_overwrite_never_deletes_a_foreign_directory(checkpoint, anchor_dataset, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    cfg = B.CacheBuildConfig(
        checkpoint=str(checkpoint),
        dataset=str(anchor_dataset),
        out=str(tmp_path / "mine"),
        num_samples=2,
        device="cpu",
        overwrite=True,
    )
    with pytest.raises(CraftVLAError, match="is not an anchor cache"):
        B.build_cache(cfg)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def _edit_meta(path, fn):
    meta = json.loads((path / "meta.json").read_text())
    fn(meta)
    (path / "meta.json").write_text(json.dumps(meta))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BROKEN = {  # corruption, file named in the message, words; all refused when the cache is opened
    "meta not JSON": (lambda c: (c / "meta.json").write_text("{"), "meta.json", "not valid JSON"),
    "meta not an object": (lambda c: (c / "meta.json").write_text("3"), "meta.json", "expected a JSON dict"),
    "meta lacks keys": (lambda c: _edit_meta(c, lambda m: m.pop("pooling")), "meta.json", "missing keys ['pooling']"),
    "meta newer format": (lambda c: _edit_meta(c, lambda m: m.update(format=7)), "meta.json", "upgrade craftvla"),
    "first shard truncated": (
        lambda c: _truncate(c / "shard-00000.safetensors"),
        "shard-00000.safetensors",
        "not a readable safetensors",
    ),
    "first shard not safetensors": (
        lambda c: (c / "shard-00000.safetensors").write_text("x" * 64),
        "shard-00000.safetensors",
        "not a readable safetensors",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_cache_names_the_file(build, tmp_path, case):
    corrupt, rel, words = BROKEN[case]
    path = shutil.copytree(build(target="pooled", dtype="float16", num_samples=5, shard_size=2), tmp_path / "c")
    corrupt(path)
    with pytest.raises(CraftVLAError) as err:
        C.AnchorCache(path)
    assert str(path / rel) in str(err.value) and words in str(err.value) and "\n" not in str(err.value)


def test_later_shard_truncated_fails_at_first_read_naming_it(build, tmp_path):
    path = shutil.copytree(build(target="pooled", dtype="float16", num_samples=5, shard_size=2), tmp_path / "c")
    _truncate(path / "shard-00002.safetensors")
    cache = C.AnchorCache(path)
    cache.samples([0, 1])  # shard 0 is intact
    with pytest.raises(CraftVLAError, match=r"shard-00002.safetensors: not a readable safetensors"):
        cache.samples([4])


def test_cache_scale_is_the_spread_of_the_cached_targets(build, checkpoint):
    """A cache run measures the scale-free loss's scale on the cache's own (teacher) targets."""
    from craftvla.craft.targets import feature_variance

    path = build(target="actions", dtype="float32", num_samples=6, shard_size=4)
    policy = _policy(checkpoint)
    plugin = CraftPlugin(policy, CraftConfig(enabled=True, anchor_cache=str(path), scale_samples=5))
    assert plugin.targets == ["actions"]
    scales = plugin.calibrate(None)
    cached = C.AnchorCache(path).samples(list(range(5)))["target.actions"]
    assert cached.shape[1:] == (policy.config.chunk_size, policy.config.action_dim)
    assert scales == {"actions": pytest.approx(feature_variance(cached).item(), rel=1e-6)}
    with pytest.raises(CraftVLAError, match="target is 'actions' in the cache but the student extracts 'pooled'"):
        CraftPlugin(policy, CraftConfig(enabled=True, anchor_cache=str(path), targets="pooled"))


def test_shipped_generalist_fingerprint_is_stable():
    """Caches built from the shipped generalist stay valid: new config sections at their defaults (e.g.
    pruning off) leave the fingerprint alone, while turning pruning on changes it."""
    from craftvla.config import PruningConfig
    from craftvla.model.policy import VLAPolicy
    from craftvla.prune.module import apply_pruning

    root = Path(__file__).resolve().parents[2] / "assets" / "generalist" / "checkpoint"
    policy = VLAPolicy.from_pretrained(root)
    assert C.model_fingerprint(policy) == "60e993f2b756a05b5eb371eef1f692a874baad6fbec01b9dbaea0ccb127032ad"
    apply_pruning(policy, PruningConfig(scorer="random"))
    assert C.model_fingerprint(policy) != "60e993f2b756a05b5eb371eef1f692a874baad6fbec01b9dbaea0ccb127032ad"
