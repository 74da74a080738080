"""Pooling patches inside the vision towers (PruningConfig.vision_merge_ratio): against hand-run
towers, in a policy, its switches and its errors."""

import pytest
import torch

from craftvla.config import L1BridgeHeadConfig, PruningConfig, VisionConfig, VLAConfig
from craftvla.errors import ConfigError
from craftvla.model.policy import VLAPolicy
from craftvla.model.speed import chunk_flops
from craftvla.model.vision import VisionBackbone
from craftvla.prune.evaluate import PruneEvalConfig, configured
from craftvla.prune.merger import ToMeMerger, TowerPool, group_matrix, patch_groups
from craftvla.prune.module import apply_pruning
from craftvla.prune.train import PruneTrainConfig, resolve_pruning


def _backbone(backbone_id: str) -> VisionBackbone:
    torch.manual_seed(0)
    cfg = VisionConfig(backbone_id=backbone_id, image_size=32, patch_size=4, width=32, depth=4, num_heads=2)
    return VisionBackbone(cfg).eval()  # 8 x 8 patches; feature layer -2: 3 of the 4 blocks run


def _by_hand(tower, images, pooled_after: int, weights: torch.Tensor, stop: int | None = None) -> torch.Tensor:
    """Run a timm ViT tower block by block, averaging its patches with `weights` ((M, N), or (B, M, N)
    per image) after one block; the patches after block `stop` if given, else after its last."""
    vit = tower.model
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(tower.normalize(images)))))
    prefix = vit.num_prefix_tokens
    for i in range(tower.block_index + 1 if stop is None else stop + 1):
        x = vit.blocks[i](x)
        if i == pooled_after:
            x = torch.cat([x[:, :prefix], weights @ x[:, prefix:]], dim=1)
    return x[:, prefix:]


@pytest.mark.parametrize("depth, block", [(1 / 3, 0), (0.5, 1), (1.0, 2), (0.0, 0)])
def test_pooling_inside_a_tower_equals_running_it_by_hand(depth, block):
    vision = _backbone("tiny-dinosiglip")  # tower 0 has 5 prefix tokens (CLS + 4 registers), tower 1 none
    pool = TowerPool(grid=8, ratio=0.25, depth=depth)
    assert pool.block(3) == block and pool.num_out == 16
    images = torch.rand(2, 3, 32, 32)
    weights = group_matrix(patch_groups(1, 8, 0.25))  # (16, 64): 2 x 2 windows
    with torch.no_grad():
        out = vision([images], pool)  # (2, 16, 64): both towers' features, concatenated
        expected = torch.cat([_by_hand(tower, images, block, weights) for tower in vision.towers], dim=-1)
        assert out.shape == (2, 16, 64)
        assert torch.allclose(out, expected, atol=1e-5)
        assert vision([images]).shape == (2, 64, 64)  # the hook is gone after the call


def test_tome_inside_fused_towers_matches_on_the_first_and_merges_the_same_patches_in_both():
    vision = _backbone("tiny-dinosiglip")
    pool = TowerPool(grid=8, ratio=0.25, depth=0.5, merger="tome")  # after block 1 of 3, 64 -> 16 patches
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        out = vision([images], pool)  # (2, 16, 64)
        first = _by_hand(vision.towers[0], images, -1, None, stop=1)  # tower 0's patches after block 1
        merged, sources, _ = ToMeMerger(16)(first, None, None)  # (2, 16, 32), (2, 64, 16)
        weights = sources.transpose(1, 2) / sources.sum(1).unsqueeze(-1)  # (2, 16, 64): each set's mean
        expected = torch.cat([_by_hand(tower, images, 1, weights) for tower in vision.towers], dim=-1)
    assert torch.equal(pool.sources, sources) and not torch.equal(sources, sources[[1, 0]])  # per image
    assert torch.allclose(out, expected, atol=1e-5)


def test_the_dense_learned_merger_in_fused_towers_starts_as_pooling_and_learns_from_the_task():
    vision = _backbone("tiny-dinosiglip")  # towers 32 + 32 wide; the instruction 12 wide here
    pool = TowerPool(8, 0.25, 0.5, "learned_v2", dims=[32, 32], text_dim=12, hidden_dim=8)
    plain = TowerPool(8, 0.25, 0.5)
    images, text = torch.rand(2, 3, 32, 32), torch.randn(2, 12)
    with torch.no_grad():
        pool.dense.prior.mul_(4.0)  # windows nearly hard: the untrained merger is the windows' average
        assert torch.allclose(vision([images], pool, text), vision([images], plain), atol=1e-4)
        assert torch.allclose(pool.sources, plain.sources.expand(2, -1, -1), atol=1e-6)
        pool.dense.text_to_slots.weight.normal_()  # another instruction, other slots
        weights = pool.weights
        vision([images], pool, torch.randn(2, 12))
        assert not torch.allclose(pool.weights, weights)
    first = _by_hand(vision.towers[0], images, -1, None, stop=1)
    with torch.no_grad():  # both towers average with the weights decided on the first tower's patches
        expected = torch.cat([_by_hand(t, images, 1, pool.dense.mix(first, text)) for t in vision.towers], dim=-1)
        assert torch.allclose(vision([images], pool, text), expected, atol=1e-5)
    vision([images], pool, text).pow(2).mean().backward()
    assert pool.dense.key.weight.grad.abs().sum() > 0 and pool.dense.prior.grad.abs().sum() > 0
    assert len(pool.sparsity) == 4  # one per forward, from the tower that decided (tower 0)


def test_learned_tome_in_fused_towers_starts_as_tome_and_weights_the_same_sets_per_tower():
    vision = _backbone("tiny-dinosiglip")
    pool = TowerPool(8, 0.25, 0.5, "learned_tome", dims=[32, 32], text_dim=12, hidden_dim=8)
    tome = TowerPool(8, 0.25, 0.5, "tome")
    images, text = torch.rand(2, 3, 32, 32), torch.randn(2, 12)
    with torch.no_grad():
        assert torch.allclose(vision([images], pool, text), vision([images], tome), atol=1e-5)
        for scores in pool.scores:  # s_n = tanh(x_n[0]) in each tower's own features
            scores.vision.weight.copy_(torch.eye(8, 32))
            scores.vision.bias.zero_()
            scores.text.weight.zero_()
            scores.score.weight.copy_(torch.eye(1, 8))
        out = vision([images], pool, text)
        first = _by_hand(vision.towers[0], images, -1, None, stop=1)
        members = ToMeMerger(16)(first, None, None)[1].transpose(1, 2)  # (2, 16, 64): tower 0 decides
        expected = []
        for tower in vision.towers:  # each tower weighs the shared sets by its own patches' scores
            patches = _by_hand(tower, images, -1, None, stop=1)  # (2, 64, 32)
            scores = torch.tanh(patches[..., :1]).transpose(1, 2)  # (2, 1, 64)
            weights = scores.masked_fill(members == 0, float("-inf")).softmax(-1)
            expected.append(_by_hand(tower, images, 1, weights))
    assert torch.allclose(out, torch.cat(expected, dim=-1), atol=1e-5)
    assert torch.equal(pool.sources, members.transpose(1, 2))  # each patch reads its set's token
    vision([images], pool, text).pow(2).mean().backward()
    assert all(scores.score.weight.grad.abs().sum() > 0 for scores in pool.scores)
    assert len(pool.sparsity) == 6 and 0.0 < pool.sparsity[-1].detach().item() < 1.0  # one per tower per forward


def test_pooling_the_last_block_is_pooling_the_towers_output():
    vision = _backbone("tiny-vit")
    images = [torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)]  # two cameras: pooled per image
    with torch.no_grad():
        full = vision(images)  # (2, 128, 32)
        pooled = vision(images, TowerPool(grid=8, ratio=0.5, depth=1.0))
    weights = group_matrix(torch.cat([patch_groups(1, 8, 0.5), patch_groups(1, 8, 0.5) + 32]))  # (64, 128)
    assert torch.allclose(pooled, torch.einsum("mn,bnd->bmd", weights, full), atol=1e-5)


@pytest.fixture(scope="module")
def no_readout():
    torch.manual_seed(0)
    cfg = VLAConfig.preset("tiny", head=L1BridgeHeadConfig(hidden_dim=64, num_heads=4))  # no flat read-out
    return VLAPolicy(cfg).eval(), cfg.fake_batch(2)


def test_a_pooled_policy_runs_on_fewer_tokens_switches_off_and_saves(no_readout, tmp_path):
    policy, batch = no_readout
    apply_pruning(policy, PruningConfig())
    original, flops = policy.encode(batch), chunk_flops(policy, batch)
    apply_pruning(policy, PruningConfig(vision_merge_ratio=0.25, scorer="fastv", keep=[0.5, 0.25]))
    assert [lay.num_vision for lay in policy.encode(batch).layouts] == [16, 16, 8, 4, 4]  # of 64 patches
    assert chunk_flops(policy, batch) < 0.5 * flops
    with torch.no_grad(), policy.pruning.disabled():
        off = policy.encode(batch)
    assert torch.equal(off.hidden_states[-1], original.hidden_states[-1])
    with torch.no_grad(), policy.pruning.disabled(("pruner",)):  # pooled, nothing selected
        assert [lay.num_vision for lay in policy.encode(batch).layouts] == [16] * 5
    actions = policy.predict_action_chunk(batch)
    policy.save_pretrained(tmp_path / "pooled")
    loaded = VLAPolicy.from_pretrained(tmp_path / "pooled").eval()
    assert loaded.config.pruning == policy.config.pruning
    assert torch.equal(loaded.predict_action_chunk(batch), actions)


def test_bad_tower_pooling_is_refused_with_the_reason(no_readout):
    policy, _ = no_readout
    with pytest.raises(ConfigError, match="merge once"):
        PruningConfig(vision_merge_ratio=0.5, merger="pool")
    with pytest.raises(ConfigError, match="vision_merge_depth"):
        PruningConfig(vision_merge_ratio=0.5, vision_merge_depth=1.5)
    with pytest.raises(ConfigError, match="power of two"):
        apply_pruning(policy, PruningConfig(vision_merge_ratio=0.3))
    apply_pruning(policy, PruningConfig())


@pytest.mark.parametrize(
    "pruning",
    [
        PruningConfig(vision_merge_ratio=0.25),
        PruningConfig(vision_merge_ratio=0.25, vision_merger="tome"),
        PruningConfig(merger="pool", merge_ratio=0.25),
    ],
    ids=["pooled in the towers", "ToMe in the towers", "pooled before the LLM"],
)
def test_a_flat_read_out_reads_each_patch_positions_merged_token(pruning):
    torch.manual_seed(0)
    cfg = VLAConfig.preset("tiny")  # 64 px, 8 x 8 patches; the head's flat read-out reads every patch
    policy, batch = VLAPolicy(cfg).eval(), cfg.fake_batch(2)
    assert policy.action_head.reads_patches
    apply_pruning(policy, pruning)
    with torch.no_grad():
        context = policy.encode(batch)
        merged = context.vision(0)  # (2, 16, D): what the LLM got
        assert merged.shape[1] == 16 and context.patches.shape == (2, 64, merged.shape[2])
        towers = policy.pruning.tower_pool
        slots = (towers.sources.argmax(-1) if towers is not None else patch_groups(1, 8, 0.25)).expand(2, -1)
        if pruning.vision_merger == "tome":
            assert not torch.equal(slots[0], slots[1])  # matched per image
        expected = merged.gather(1, slots.unsqueeze(-1).expand(-1, -1, merged.shape[2]))  # (2, 64, D)
        assert torch.equal(context.patches, expected)  # every patch reads the token it went into
        with policy.pruning.disabled():
            assert not torch.allclose(policy.encode(batch).patches, context.patches)
        policy.predict_action_chunk(batch)  # the read-out's (B, 64 * C) input has its shape


def test_prune_eval_and_train_carry_the_tower_pooling():
    current = PruningConfig(vision_merge_ratio=0.25, vision_merge_depth=0.5)
    assert configured(PruneEvalConfig(), current) == current
    applied = configured(PruneEvalConfig(vision_merge_ratio=0.5, vision_merge_depth=0.0), PruningConfig())
    assert (applied.vision_merge_ratio, applied.vision_merge_depth) == (0.5, 0.0)
    stage2 = resolve_pruning(PruneTrainConfig(stage=2, init_from="x"), current)
    assert (stage2.vision_merge_ratio, stage2.vision_merge_depth, stage2.scorer) == (0.25, 0.5, "attention")


def test_a_learned_tower_pool_weights_each_window_by_its_scores_and_the_instruction():
    torch.manual_seed(0)
    pool = TowerPool(4, 0.25, 0.5, "learned_window", dims=[4], text_dim=3, hidden_dim=4)
    tokens, text = torch.randn(4, 1 + 16, 4), torch.randn(2, 3)  # 2 cameras x batch 2; 1 prefix token
    plain = TowerPool(grid=4, ratio=0.25, depth=0.5)(tokens, prefix=1)
    assert torch.allclose(pool(tokens, 1, 0, text), plain, atol=1e-6)  # untrained: the average
    with torch.no_grad():  # s_n = tanh(x_n[0] + t[0])
        scores = pool.scores[0]
        scores.vision.weight.copy_(torch.eye(4))
        scores.vision.bias.zero_()
        scores.text.weight.copy_(torch.eye(4, 3))
        scores.score.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
        out = pool(tokens, 1, 0, text)
    assert torch.equal(out[:, 0], tokens[:, 0])  # the prefix token passes through
    groups = patch_groups(1, 4, 0.25)
    for row in range(4):
        t = text[row % 2]  # cameras are stacked on the batch axis: rows 0, 1 camera 1; 2, 3 camera 2
        for m in range(4):
            patches = tokens[row, 1:][groups == m]  # (4, 4)
            w = torch.tanh(patches[:, 0] + t[0]).softmax(dim=0)
            assert torch.allclose(out[row, 1 + m], (w[:, None] * patches).sum(0), atol=1e-6)
    assert pool.sparsity and pool.sparsity[-1] < 1.0
    with pytest.raises(ValueError, match="instruction"):
        pool(tokens, 1, 0, None)


def test_a_learned_tower_pool_in_a_policy_starts_as_pooling(no_readout):
    policy, batch = no_readout
    apply_pruning(policy, PruningConfig(vision_merge_ratio=0.25))
    pooled = policy.predict_action_chunk(batch)
    apply_pruning(policy, PruningConfig(vision_merge_ratio=0.25, vision_merger="learned_window"))
    assert torch.allclose(policy.predict_action_chunk(batch), pooled, atol=1e-5)
    assert policy.pruning.learned_merge is policy.pruning.tower_pool
    assert "merge_sparsity" in policy.encode(batch).pruning
    apply_pruning(policy, PruningConfig())


def test_tome_in_the_towers_spreads_each_cameras_tokens_over_its_own_patches():
    torch.manual_seed(0)
    cfg = VLAConfig.preset("tiny", camera_keys=["observation.images.corner", "observation.images.wrist"])
    policy, batch = VLAPolicy(cfg).eval(), cfg.fake_batch(3)
    apply_pruning(policy, PruningConfig(vision_merge_ratio=0.25, vision_merger="tome"))
    with torch.no_grad():
        context = policy.encode(batch)
    merged, slots = context.vision(0), policy.pruning.tower_pool.sources.argmax(-1)  # (3, 32, D), (6, 64)
    assert merged.shape[1] == 32 and context.patches.shape[1] == 128
    for camera in range(2):  # camera c's rows are c * B ... (c + 1) * B - 1; its tokens follow camera c-1's 16
        for b in range(3):
            index = 16 * camera + slots[3 * camera + b]  # (64,)
            assert torch.equal(context.patches[b, 64 * camera : 64 * (camera + 1)], merged[b, index])
