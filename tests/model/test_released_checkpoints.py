"""Released VLA-Adapter and Prismatic checkpoints: the real key names and shapes (committed in
fixtures/vla_adapter_release.json, no weights) through the loader at full size on the meta device,
and small directories in exactly those layouts read from disk with their values."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from craftvla import VLAConfig, VLAPolicy
from craftvla.config import L1BridgeHeadConfig, LLMConfig, VisionConfig
from craftvla.errors import CraftVLAError
from craftvla.model import released
from craftvla.model.released import load_llm, load_release, split_prismatic, split_vla_adapter

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "vla_adapter_release.json").read_text())
FILES = FIXTURE["files"]


def _meta(table: dict) -> dict:
    return {k: torch.empty(shape, device="meta") for k, shape in table.items()}


def _shapes(state: dict) -> dict:
    return {k: list(v.shape) for k, v in state.items()}


# ----- the committed key list against the real libraries ------------------------------------------------


def test_the_key_list_is_what_timm_and_transformers_build():
    """DINOv2 / SigLIP from timm and Qwen2.5-0.5B from transformers, built on the meta device, have
    exactly the fixture's names and shapes (with the HF export's `scale_factor` for `gamma`)."""
    import timm
    from transformers import AutoConfig, AutoModelForCausalLM

    qwen = dict(FIXTURE["qwen2.5-0.5b"])
    with torch.device("meta"):
        towers = [
            timm.create_model(name, pretrained=False, num_classes=0, img_size=224)
            for name in ("vit_large_patch14_reg4_dinov2", "vit_so400m_patch14_siglip_224")
        ]
        llm = AutoModelForCausalLM.from_config(
            AutoConfig.for_model(
                qwen.pop("model_type"),
                **{
                    k: v
                    for k, v in qwen.items()
                    if k
                    in (
                        "hidden_size",
                        "num_hidden_layers",
                        "num_attention_heads",
                        "num_key_value_heads",
                        "intermediate_size",
                        "vocab_size",
                        "tie_word_embeddings",
                    )
                },
            )
        )
    expected = {}
    for prefix, tower in zip(("vision_backbone.featurizer.", "vision_backbone.fused_featurizer."), towers):
        expected |= {prefix + k.replace(".gamma", ".scale_factor"): s for k, s in _shapes(tower.state_dict()).items()}
    expected |= {"language_model." + k: s for k, s in _shapes(llm.state_dict()).items() if k != "lm_head.weight"}
    ours = {k: s for k, s in FILES["model.safetensors"].items() if not k.startswith(("projector.", "action_queries"))}
    assert ours == expected
    prismatic = FILES["checkpoints/latest-checkpoint.pt"]["model"]
    assert prismatic["vision_backbone"] == {
        f"{p}.{k}": s
        for p, tower in zip(("dino_featurizer", "siglip_featurizer"), towers)
        for k, s in _shapes(tower.state_dict()).items()
    }
    assert prismatic["llm_backbone"] == {"llm." + k: s for k, s in _shapes(llm.state_dict()).items()}


@pytest.fixture(scope="module")
def real_shaped_policy():
    with torch.device("meta"):
        return VLAPolicy(VLAConfig.preset("vla-adapter-qwen2.5-0.5b"), load_weights=False)


def _release(root="release", drop=(), extra=()):
    state = _meta(FILES["model.safetensors"])
    for key in drop:
        state.pop(key)
    state |= {k: torch.empty(1, device="meta") for k in extra}
    proprio = {k.removeprefix("module."): v for k, v in _meta(FILES["proprio_projector--checkpoint.pt"]).items()}
    head = {k.removeprefix("module."): v for k, v in _meta(FILES["action_head--checkpoint.pt"]).items()}
    return split_vla_adapter(
        Path(root),
        state,
        (Path("proprio_projector--checkpoint.pt"), proprio),
        (Path("action_head--checkpoint.pt"), head),
    )


def test_every_released_tensor_fits_the_real_shaped_preset(real_shaped_policy):
    """All 982 tensors of model.safetensors, the proprio projector and the 217,864,223-parameter Pro
    action head (its film_gen included) load strictly into the preset (meta device)."""
    release = _release()
    assert len(release.towers) == 2 and release.queries.shape == (64, 896)
    load_llm(real_shaped_policy.llm, release)
    load_release(real_shaped_policy, release, load_head=True)
    head = real_shaped_policy.action_head
    assert sum(p.numel() for p in head.model.parameters()) == 217_864_223
    assert set(head.model.state_dict()) == {k.removeprefix("model.") for k in release.head[1]}


def test_a_released_head_asks_for_the_vla_adapter_head_type():
    with torch.device("meta"):
        cfg = VLAConfig.preset("vla-adapter-qwen2.5-0.5b", head=L1BridgeHeadConfig(hidden_dim=896, num_heads=8))
        bridge = VLAPolicy(cfg, load_weights=False)
    with pytest.raises(CraftVLAError, match="another head architecture.*MLPResNet.*--policy.head.type vla_adapter"):
        load_release(bridge, _release(), load_head=True)


def test_a_prismatic_checkpoint_fits_the_real_shaped_preset(real_shaped_policy):
    nested = {
        "model": {m: _meta(t) for m, t in FILES["checkpoints/latest-checkpoint.pt"]["model"].items()},
        "optimizer": {},
    }
    release = split_prismatic(Path("run"), Path("run/checkpoints/latest-checkpoint.pt"), nested)
    assert release.queries is None and len(release.towers) == 2
    load_llm(real_shaped_policy.llm, release)
    load_release(real_shaped_policy, release, load_head=True)


@pytest.mark.parametrize(
    "drop,extra,words",
    [
        (("language_model.model.layers.3.mlp.up_proj.weight",), (), "1 missing.*layers.3.mlp.up_proj.weight"),
        (("vision_backbone.featurizer.blocks.5.ls1.scale_factor",), (), "1 missing.*blocks.5.ls1.gamma"),
        ((), ("vision_backbone.featurizer.blocks.99.attn.qkv.weight",), "1 unexpected.*blocks.99.attn.qkv.weight"),
        ((), ("lm_head.weight",), "model.safetensors: 1 unexpected keys.*lm_head.weight"),
    ],
)
def test_errors_name_the_missing_and_unexpected_keys(real_shaped_policy, drop, extra, words):
    with pytest.raises(CraftVLAError, match=words):
        release = _release(drop=drop, extra=extra)
        load_llm(real_shaped_policy.llm, release)
        load_release(real_shaped_policy, release, load_head=False)


# ----- small directories in the released layouts, read from disk ----------------------------------------

TEXT = dict(
    model_type="qwen2",
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=260,
    tie_word_embeddings=True,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
)
VISION = VisionConfig(backbone_id="tiny-dinosiglip", image_size=32, patch_size=8, width=32, depth=2, num_heads=2)


def _small_parts(seed=0):
    """Full (unpruned) tiny towers, a tied Qwen2 CausalLM and the other parts, as their owners hold them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from craftvla.model.vision import _tiny_vit

    torch.manual_seed(seed)
    text = dict(TEXT)
    llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(text.pop("model_type"), **text))
    towers = [_tiny_vit(VISION, reg_tokens=4), _tiny_vit(VISION, class_token=False)]
    fused, dim = 64, 64
    projector = {
        "fc1.weight": torch.randn(4 * fused, fused),
        "fc1.bias": torch.randn(4 * fused),
        "fc2.weight": torch.randn(dim, 4 * fused),
        "fc2.bias": torch.randn(dim),
        "fc3.weight": torch.randn(dim, dim),
        "fc3.bias": torch.randn(dim),
    }
    return llm, towers, projector


def _small_config(root, **kw):
    return VLAConfig(
        vision=VISION,
        llm=LLMConfig(
            family="qwen2",
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=128,
            attention="causal",
        ),
        weights_dir=str(root),
        **kw,
    )


def write_vla_adapter_release(root: Path):
    """The files of a VLA-Adapter Hugging Face release, at toy width: one model.safetensors with the
    release's prefixes, DDP-prefixed bf16 head files pickled as OrderedDicts, its tokenizer files."""
    from craftvla.model.language import byte_tokenizer

    llm, towers, projector = _small_parts()
    root.mkdir(parents=True)
    state = {"vision_backbone.featurizer." + k: v for k, v in towers[0].state_dict().items()}
    state |= {"vision_backbone.fused_featurizer." + k: v for k, v in towers[1].state_dict().items()}
    state |= {"projector." + k: v for k, v in projector.items()}
    state |= {"language_model." + k: v for k, v in llm.state_dict().items() if k != "lm_head.weight"}
    state["action_queries.weight"] = torch.randn(8, 64)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, root / "model.safetensors")
    (root / "config.json").write_text(
        json.dumps(
            {"model_type": "openvla", "text_config": TEXT, "timm_model_ids": ["tiny", "tiny"], "image_sizes": [32, 32]}
        )
    )
    proprio = OrderedDict(
        {
            "module.fc1.weight": torch.randn(64, 4),
            "module.fc1.bias": torch.randn(64),
            "module.fc2.weight": torch.randn(64, 64),
            "module.fc2.bias": torch.randn(64),
        }
    )
    torch.save(OrderedDict((k, v.bfloat16()) for k, v in proprio.items()), root / "proprio_projector--checkpoint.pt")
    head = OrderedDict(
        {
            "module.model.fc1.weight": torch.randn(64, 64 * 4).bfloat16(),
            "module.model.mlp_resnet_blocks.0.k_task.weight": torch.randn(64, 64).bfloat16(),
        }
    )
    torch.save(head, root / "action_head--checkpoint.pt")
    byte_tokenizer().save_pretrained(root)
    return {k: v.to(torch.bfloat16).float() for k, v in state.items()}, proprio


def test_a_vla_adapter_release_directory_loads_every_value(tmp_path):
    state, proprio = write_vla_adapter_release(tmp_path / "release")
    with pytest.raises(CraftVLAError, match="action_head--checkpoint.pt: 2 tensors of another head"):
        VLAPolicy(_small_config(tmp_path / "release"))
    policy = VLAPolicy(_small_config(tmp_path / "release", load_action_head=False))
    assert policy.config.llm.tokenizer == str(tmp_path / "release")  # the release's own tokenizer
    assert policy.llm.model.config.rope_parameters["rope_theta"] == 1_000_000.0  # not the shape fields' default
    assert policy.llm.model.config.tie_word_embeddings
    ours = policy.state_dict()
    pairs = {
        "llm.model.layers.1.self_attn.k_proj.bias": "language_model.model.layers.1.self_attn.k_proj.bias",
        "llm.model.embed_tokens.weight": "language_model.model.embed_tokens.weight",
        "vision.towers.0.model.reg_token": "vision_backbone.featurizer.reg_token",
        "vision.towers.1.model.blocks.0.attn.qkv.weight": "vision_backbone.fused_featurizer.blocks.0.attn.qkv.weight",
        "projector.fc2.weight": "projector.fc2.weight",
        "action_queries.weight": "action_queries.weight",
    }
    for mine, theirs in pairs.items():
        assert torch.equal(ours[mine], state[theirs]), mine
    assert "vision.towers.0.model.blocks.1.attn.qkv.weight" not in ours  # the last block is pruned
    torch.testing.assert_close(policy.action_head.proprio[0].weight, proprio["module.fc1.weight"].bfloat16().float())
    loss, _ = policy(policy.config.fake_batch(2))
    assert torch.isfinite(loss)


def write_prismatic_run(root: Path, with_vision: bool = True):
    """A Prismatic training run directory: config.json and checkpoints/latest-checkpoint.pt, nested by module."""
    llm, towers, projector = _small_parts(seed=1)
    (root / "checkpoints").mkdir(parents=True)
    (root / "config.json").write_text(
        json.dumps({"model": {"llm_backbone_id": "tiny-qwen2", "vision_backbone_id": "tiny-dinosiglip"}})
    )
    modules = {
        "projector": {
            f"projector.{i}.{p}": projector[f"fc{j}.{p}"]
            for i, j in ((0, 1), (2, 2), (4, 3))
            for p in ("weight", "bias")
        },
        "llm_backbone": {"llm." + k: v for k, v in llm.state_dict().items()},
    }
    if with_vision:
        modules["vision_backbone"] = {
            f"{name}.{k}": v
            for name, tower in zip(("dino_featurizer", "siglip_featurizer"), towers)
            for k, v in tower.state_dict().items()
        }
    torch.save(
        {"model": modules, "optimizer": {"state": {}, "param_groups": []}},
        root / "checkpoints" / "step-000010-epoch-00-loss=0.5000.pt",
    )
    torch.save({"model": modules}, root / "checkpoints" / "latest-checkpoint.pt")
    return modules


def test_a_prismatic_run_directory_loads_every_value(tmp_path, monkeypatch):
    monkeypatch.setitem(released.PRISMATIC_LLMS, "tiny-qwen2", TEXT)
    modules = write_prismatic_run(tmp_path / "run")
    policy = VLAPolicy(_small_config(tmp_path / "run"))
    ours = policy.state_dict()
    assert torch.equal(ours["projector.fc1.weight"], modules["projector"]["projector.0.weight"])
    assert torch.equal(ours["llm.model.norm.weight"], modules["llm_backbone"]["llm.model.norm.weight"])
    assert torch.equal(
        ours["vision.towers.1.model.pos_embed"], modules["vision_backbone"]["siglip_featurizer.pos_embed"]
    )
    assert policy.llm.model.config.rope_parameters["rope_theta"] == 1_000_000.0


def test_a_prismatic_run_without_its_vision_backbone_asks_for_the_towers(tmp_path, monkeypatch):
    monkeypatch.setitem(released.PRISMATIC_LLMS, "tiny-qwen2", TEXT)
    write_prismatic_run(tmp_path / "run", with_vision=False)
    with pytest.raises(CraftVLAError, match="holds no vision backbone.*--policy.vision.weights_dir"):
        VLAPolicy(_small_config(tmp_path / "run"))


def test_broken_release_files_are_clear_errors(tmp_path):
    write_vla_adapter_release(tmp_path / "r")
    (tmp_path / "r" / "action_head--20000_checkpoint.pt").write_bytes(b"x")
    with pytest.raises(CraftVLAError, match="2 action_head files"):
        VLAPolicy(_small_config(tmp_path / "r", load_action_head=False))
    (tmp_path / "r" / "action_head--20000_checkpoint.pt").unlink()
    (tmp_path / "r" / "proprio_projector--checkpoint.pt").write_bytes(b"not a torch file")
    with pytest.raises(CraftVLAError, match="proprio_projector--checkpoint.pt: cannot load"):
        VLAPolicy(_small_config(tmp_path / "r", load_action_head=False))
