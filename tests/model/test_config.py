"""Configs: validation errors name the field, YAML + overrides through draccus, presets."""

import json
import subprocess
import sys

import pytest

from craftvla import VLAConfig
from craftvla.cli.parsing import parse_config
from craftvla.config import L1BridgeHeadConfig, LLMConfig, VisionConfig
from craftvla.errors import ConfigError, CraftVLAError


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: VisionConfig(image_size=60, patch_size=8), "vision.image_size"),
        (lambda: VisionConfig(backbone_id="resnet"), "vision.backbone_id"),
        (
            lambda: VisionConfig(backbone_id="tiny-vit", use_fused_vision_backbone=True),
            "vision.use_fused_vision_backbone",
        ),
        (lambda: LLMConfig(attention="sideways"), "llm.attention"),
        (lambda: LLMConfig(family="bert", attention="causal"), "llm.attention"),
        (lambda: LLMConfig(hidden_size=100, num_heads=3), "llm.hidden_size"),
        (lambda: LLMConfig(num_heads=4, num_kv_heads=3), "llm.num_kv_heads"),
        (lambda: L1BridgeHeadConfig(vision_source="camera"), "head.vision_source"),
        (lambda: L1BridgeHeadConfig(hidden_dim=30, num_heads=4), "head.hidden_dim"),
        (lambda: VLAConfig(camera_keys=["image"]), "camera_keys"),
        (lambda: VLAConfig(camera_keys=[f"observation.images.c{i}" for i in range(4)]), "camera_keys"),
        (lambda: VLAConfig(chunk_size=0), "chunk_size"),
        (lambda: VLAConfig(normalization={"action": "zscore"}), "normalization"),
        (lambda: VLAConfig.preset("huge"), "preset"),
    ],
)
def test_invalid_configs_name_the_field(make, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.").replace("[", r"\[")):
        make()


def test_weights_dir_is_resolved_when_the_policy_is_built_not_in_the_config(tmp_path):
    """The config reads no file: a missing weights_dir is refused when a policy is built from it."""
    from craftvla.model.policy import VLAPolicy

    cfg = VLAConfig.preset("tiny", weights_dir=str(tmp_path / "missing"))  # no error: nothing read yet
    with pytest.raises(ConfigError, match="weights_dir=.*missing.*no such directory"):
        VLAPolicy(cfg)
    (tmp_path / "parts").mkdir()  # craftvla's parts layout: llm/ and vision/ under it
    cfg = VLAConfig.preset("tiny", weights_dir=str(tmp_path / "parts"))
    with pytest.raises(CraftVLAError, match=r"llm.weights_dir=.*parts/llm': no config.json there"):
        VLAPolicy(cfg)  # the parts are not there: the error names where the policy looked
    assert (cfg.llm.weights_dir, cfg.vision.weights_dir) == (
        str(tmp_path / "parts" / "llm"),
        str(tmp_path / "parts" / "vision"),
    )


def test_fused_backbone_is_inferred_and_picks_the_fused_projector():
    cfg = VLAConfig(vision=VisionConfig(backbone_id="tiny-dinosiglip"))
    assert cfg.vision.use_fused_vision_backbone is True and cfg.projector.type == "fused_mlp"
    assert VLAConfig().projector.type == "mlp"


def test_yaml_with_overrides_and_unknown_keys(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("chunk_size: 4\nllm:\n  num_layers: 2\nvision:\n  image_size: 96\n")
    cfg = VLAConfig.from_yaml(path, args=["--llm.attention", "causal", "--action_dim", "7"])
    assert (cfg.chunk_size, cfg.llm.num_layers, cfg.vision.image_size, cfg.llm.attention, cfg.action_dim) == (
        4,
        2,
        96,
        "causal",
        7,
    )
    path.write_text("chunk_sise: 4\n")
    with pytest.raises(ConfigError, match="chunk_sise"):
        parse_config(VLAConfig, config_path=str(path))
    with pytest.raises(ConfigError, match="not found"):
        parse_config(VLAConfig, config_path=str(tmp_path / "missing.yaml"))


def test_dict_round_trip_and_unknown_key():
    cfg = VLAConfig.preset("tiny")
    assert VLAConfig.from_dict(json.loads(cfg.to_json())) == cfg
    bad = cfg.to_dict()
    bad["vision"]["patchsize"] = 4
    with pytest.raises(ConfigError, match="patchsize"):
        VLAConfig.from_dict(bad)


def test_presets_have_the_documented_shapes():
    tiny = VLAConfig.preset("tiny")
    assert 64 <= tiny.vision.image_size <= 128 and 2 <= tiny.llm.num_layers <= 4 and 128 <= tiny.llm.hidden_size <= 256
    real = VLAConfig.preset("vla-adapter-qwen2.5-0.5b")
    assert real.vision.use_fused_vision_backbone and real.vision.image_size == 224
    assert (real.llm.hidden_size, real.llm.num_layers, real.num_action_queries) == (896, 24, 64)
    assert VLAConfig.preset("tiny", chunk_size=4).chunk_size == 4


def test_pruning_preset_has_256_vision_tokens():
    from craftvla.model.policy import VLAPolicy

    cfg = VLAConfig.preset("tiny-256")
    policy = VLAPolicy(cfg).eval()
    context = policy.encode(cfg.fake_batch(1))
    assert policy.vision.num_patches == 256 and context.layouts[0].num_vision == 256


def test_fake_batch_follows_the_config():
    cfg = VLAConfig.preset("tiny", camera_keys=["observation.images.a", "observation.images.b"], state_dim=7)
    batch = cfg.fake_batch(batch_size=3)
    assert batch["observation.images.b"].shape == (3, 3, 64, 64)
    assert 0 <= batch["observation.images.a"].min() and batch["observation.images.a"].max() <= 1
    assert batch["observation.state"].shape == (3, 7) and batch["action"].shape == (3, 8, 4)
    assert batch["action_is_pad"].dtype.is_floating_point is False and len(batch["task"]) == 3


def test_cli_info_and_clean_errors():
    run = lambda *a: subprocess.run([sys.executable, "-m", "craftvla", *a], capture_output=True, text=True)
    ok = run("info", "--preset", "vla-adapter-qwen2.5-0.5b")
    assert ok.returncode == 0 and "494.033 M params" in ok.stdout  # Qwen2.5-0.5B without LM head
    bad = run("info", "--preset", "huge")
    assert bad.returncode != 0 and "preset='huge'" in bad.stderr and "Traceback" not in bad.stderr
    assert run("nope").returncode == 2
