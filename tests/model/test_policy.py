"""The policy interface: shapes for every component combination, round trips, counts, overfitting."""

import copy

import pytest
import torch

from craftvla import VLAConfig, VLAPolicy
from craftvla.config import LLMConfig, ProjectorConfig, VisionConfig
from craftvla.errors import CraftVLAError
from craftvla.keys import IMAGE_PREFIX
from craftvla.model.context import bridge_features

from .conftest import micro_config

CAMERAS = [IMAGE_PREFIX + name for name in ("corner", "wrist", "top")]


@pytest.mark.parametrize("backbone", ["tiny-vit", "tiny-dinosiglip"])
@pytest.mark.parametrize("projector", ["linear", "mlp", "fused_mlp"])
@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
@pytest.mark.parametrize("n_cams", [1, 3])
def test_shapes_for_every_combination(backbone, projector, attention, n_cams):
    vision = VisionConfig(backbone_id=backbone, image_size=32, patch_size=8, width=32, depth=2, num_heads=2)
    llm = LLMConfig(
        hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, attention=attention
    )
    cfg = micro_config(vision=vision, llm=llm, projector=ProjectorConfig(type=projector), camera_keys=CAMERAS[:n_cams])
    policy = VLAPolicy(cfg)
    batch = cfg.fake_batch(batch_size=3)
    out = policy.compute_loss(batch)
    layout = out.context.layouts[0]
    n_vis = n_cams * 16  # (32 / 8)^2 patches per image
    assert layout.vision_index.shape == (3, n_vis)
    assert layout.query_index.shape == (3, cfg.num_action_queries)
    assert len(out.context.hidden_states) == cfg.llm.num_layers + 1
    assert out.context.hidden_states[0].shape == (3, layout.seq_len, 64)
    assert layout.seq_len == 1 + n_vis + layout.text_index.shape[1] + cfg.num_action_queries + 1
    assert policy.predict_action_chunk(batch).shape == (3, cfg.chunk_size, cfg.action_dim)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert bridge_features(out.context).shape == (3, 2 * 64)
    assert policy.vision.embed_dim == (64 if backbone == "tiny-dinosiglip" else 32)


@pytest.mark.parametrize("family", ["llama", "mistral", "bert"])
def test_other_llm_families(family):
    llm = LLMConfig(
        family=family,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4 if family == "bert" else 2,
        intermediate_size=128,
    )
    cfg = micro_config(llm=llm)
    policy = VLAPolicy(cfg)
    loss, metrics = policy(cfg.fake_batch(2))
    assert torch.isfinite(loss) and "l1_loss" in metrics
    assert policy.llm.is_encoder == (family == "bert")


def test_layout_indices_select_the_right_tokens(micro):
    policy = VLAPolicy(micro)
    batch = micro.fake_batch(2)
    ids, mask = policy.tokenize(batch["task"])
    layout = policy.encode(batch).layouts[0]
    seq_ids = torch.full((2, layout.seq_len), -1)
    seq_ids.scatter_(1, layout.text_index, ids)
    assert torch.equal(layout.text(seq_ids.unsqueeze(-1))[0].squeeze(-1), ids)
    assert torch.equal(layout.text_mask, mask)
    # the padding of the shorter instruction is masked out, every other token is attended
    assert layout.attention_mask.sum(1).tolist() == [layout.seq_len - int((~m).sum()) for m in mask]
    assert layout.vision_index.tolist() == [list(range(1, 1 + policy.vision.num_patches))] * 2
    assert layout.query_index[:, -1].tolist() == [layout.seq_len - 2] * 2  # queries sit right before STOP


def test_batch_is_not_mutated(micro):
    policy = VLAPolicy(micro)
    batch = micro.fake_batch(2)
    before = copy.deepcopy(batch)
    policy(batch)
    policy.predict_action_chunk(batch)
    assert batch.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(batch[key], value) if torch.is_tensor(value) else batch[key] == value


def test_save_load_round_trip_gives_identical_outputs(micro, tmp_path):
    import numpy as np

    policy = VLAPolicy(micro).eval()
    policy.processor.set_stats({"action": {"mean": np.array([0.1, 0.2, 0.3, 0.4]), "std": np.ones(4)}}, "test")
    batch = micro.fake_batch(3)
    policy.save_pretrained(tmp_path / "ckpt")
    loaded = VLAPolicy.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config.to_dict() == policy.config.to_dict()  # the tiny preset has no source paths
    assert torch.equal(loaded.predict_action_chunk(batch), policy.predict_action_chunk(batch))
    assert np.allclose(loaded.processor.stats["action"]["mean"], [0.1, 0.2, 0.3, 0.4])
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json",
        "llm_config.json",
        "model.safetensors",
        "processor.json",
        "stats.json",
        "tokenizer",
    ]
    assert loaded.processor.stats_source == "test"


def test_save_replaces_atomically_and_leaves_no_temp(micro, tmp_path):
    policy = VLAPolicy(micro)
    policy.save_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        policy.action_queries.weight.fill_(0.5)
    policy.save_pretrained(tmp_path / "ckpt")  # overwrite
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert VLAPolicy.from_pretrained(tmp_path / "ckpt").action_queries.weight.eq(0.5).all()


def test_trainable_parameter_counts(micro):
    policy = VLAPolicy(micro)
    d, q, dv = 64, micro.num_action_queries, 32
    assert policy.action_queries.weight.numel() == q * d
    assert sum(p.numel() for p in policy.projector.parameters()) == (dv * d + d) + (d * d + d)  # mlp
    assert not policy.action_queries.weight.any()  # zero-initialised (VLA-Adapter)
    assert all(block.gate.item() == 0.0 for block in policy.action_head.blocks)
    parts = [policy.vision, policy.projector, policy.llm, policy.action_queries, policy.action_head]
    assert sum(p.numel() for m in parts for p in m.parameters()) == sum(p.numel() for p in policy.parameters())
    for p in policy.vision.parameters():
        p.requires_grad_(False)
    frozen = sum(p.numel() for p in policy.vision.parameters())
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in policy.parameters()) - frozen


def test_tiny_preset_overfits_one_batch():
    torch.manual_seed(0)
    cfg = VLAConfig.preset("tiny")
    policy = VLAPolicy(cfg)
    batch = cfg.fake_batch(batch_size=4)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3, weight_decay=0.0)
    first = None
    for step in range(200):  # noqa: B007 (the message reports it)
        loss, _ = policy(batch)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < first / 10:
            break
    assert loss.item() < first / 10, f"loss {first:.3f} -> {loss.item():.3f} after {step + 1} steps"


def test_missing_batch_key_is_a_clear_error(micro):
    batch = micro.fake_batch(2)
    del batch["observation.state"]
    with pytest.raises(CraftVLAError, match="observation.state"):
        VLAPolicy(micro)(batch)


def test_padded_actions_do_not_count_in_the_loss(micro):
    policy = VLAPolicy(micro)
    batch = micro.fake_batch(2)
    loss, _ = policy(batch)
    batch["action"] = batch["action"].clone()
    batch["action"][batch["action_is_pad"]] = 100.0  # garbage where padded
    assert torch.equal(policy(batch)[0], loss)


@pytest.mark.parametrize("source", ["llm", "projector"])
def test_head_vision_source(source):
    """vision_source "llm": block l reads LLM layer l's vision states; "projector": every block reads
    the vision tokens entering the LLM (hidden_states[0])."""
    cfg = micro_config()
    cfg.head.vision_source = source
    policy = VLAPolicy(cfg).eval()
    seen = {}
    for block in policy.action_head.blocks:  # record the vision states each block's condition() reads
        block.condition = (
            lambda orig: lambda vision, *rest: (seen.setdefault("vision", []).append(vision), orig(vision, *rest))[1]
        )(block.condition)
    context = policy.compute_loss(cfg.fake_batch(2)).context
    layers = range(1, cfg.llm.num_layers + 1)
    expected = [context.vision(0 if source == "projector" else layer) for layer in layers]
    assert len(seen["vision"]) == cfg.llm.num_layers
    assert all(torch.equal(a, b) for a, b in zip(seen["vision"], expected))


def test_compiled_inference_equals_eager():
    """torch.compile on the inference path gives the eager chunk (the speed is measured in benchmarks/inference)."""
    torch.manual_seed(0)
    cfg = micro_config()
    policy = VLAPolicy(cfg).eval()
    batch = cfg.fake_batch(2)
    eager = policy.predict_action_chunk(batch)
    policy.compile_inference()
    torch.testing.assert_close(policy.predict_action_chunk(batch), eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("head", ["l1_bridge", "flow_matching", "discrete", "discrete_ar"])
def test_inference_path_is_one_graph_without_host_syncs(head):
    """torch.compile traces predict_action_chunk into one graph: no data-dependent Python control
    flow or .item()/.tolist() (a host sync on a GPU) anywhere on the inference path of any head."""
    import torch._dynamo as dynamo

    from craftvla.config import DiscreteHeadConfig, FlowMatchingHeadConfig
    from craftvla.keys import TOKENS_KEY, TOKENS_MASK_KEY

    heads = {
        "l1_bridge": None,
        "flow_matching": FlowMatchingHeadConfig(hidden_dim=32, num_steps=3),
        "discrete": DiscreteHeadConfig(num_bins=16),
        "discrete_ar": DiscreteHeadConfig(num_bins=16),
    }
    overrides = {} if heads[head] is None else {"head": heads[head]}
    if head == "discrete_ar":
        overrides["llm"] = LLMConfig(
            hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, attention="causal"
        )
    torch.manual_seed(0)
    cfg = micro_config(**overrides)
    policy = VLAPolicy(cfg).eval()
    batch = cfg.fake_batch(2)
    batch.pop("action")
    batch[TOKENS_KEY], batch[TOKENS_MASK_KEY] = policy.tokenize(batch["task"])
    dynamo.reset()
    explained = dynamo.explain(policy._predict)(batch)
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    assert explained.graph_count == 1


def test_bf16_inference_under_autocast_stays_close_to_fp32():
    torch.manual_seed(0)
    cfg = micro_config()
    policy = VLAPolicy(cfg).eval()
    batch = cfg.fake_batch(2)
    fp32 = policy.predict_action_chunk(batch)
    assert policy.set_inference_precision("auto").inference_dtype is None  # CPU: fp32
    policy.set_inference_precision("bf16")
    bf16 = policy.predict_action_chunk(batch)
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)  # it ran in bf16
    assert (bf16 - fp32).abs().max() < 0.03  # measured 0.010 on chunks of size ~1: bf16 keeps ~3 significant digits
    with pytest.raises(CraftVLAError, match="precision"):
        policy.set_inference_precision("fp8")
