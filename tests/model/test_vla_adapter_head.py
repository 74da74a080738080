"""The `vla_adapter` head: VLA-Adapter's released action head, equal to their code on files their
code wrote (fixtures/vla_adapter/make_reference.py), reading the states their code reads."""

import dataclasses
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from craftvla import VLAPolicy
from craftvla.config import PruningConfig, VLAAdapterHeadConfig
from craftvla.errors import ConfigError, CraftVLAError
from craftvla.model.released import _module_file, load_vla_adapter_head
from craftvla.model.sequence import build_sequence

from .conftest import micro_config
from .fixtures.vla_adapter.compare import load_head, predict

FIXTURE = Path(__file__).parent / "fixtures/vla_adapter"
VARIANTS = ("original", "pro")


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_head_predicts_their_chunks_from_their_files(variant):
    """Their bf16 DDP files load strictly; on identical LLM states and proprio the chunks agree to
    1e-5 in fp32 and 1e-12 in fp64 (the same function, not only close), at inference and in training
    (fed the perturbation their training phase drew)."""
    meta = json.loads((FIXTURE / variant / "meta.json").read_text())
    assert meta["commit"].startswith("838a36d") and meta["written_by"].startswith("VLA-Adapter's own code")
    for tag, atol in (("fp32", 1e-5), ("fp64", 1e-12)):
        ours, theirs = predict(FIXTURE / variant, tag)
        for phase in ("inference", "training"):
            assert ours[phase].shape == theirs[phase].shape == (2, 8, 7)
            assert theirs[phase].abs().mean() > 0.1  # not a trivially small output
            torch.testing.assert_close(ours[phase], theirs[phase], rtol=0, atol=atol, msg=f"{variant} {tag} {phase}")
        assert not torch.equal(theirs["training"], theirs["inference"])  # the perturbation matters
    rows_equal = torch.equal(theirs["inference"][:, 1:], theirs["inference"][:, :1].expand(-1, 7, -1))
    assert rows_equal == (variant == "original")  # the original block cannot tell a chunk's rows apart


def test_a_file_of_the_other_variant_or_with_foreign_keys_is_refused():
    pro, _ = load_head(FIXTURE / "pro")
    path, state = _module_file(FIXTURE / "original", "action_head")
    with pytest.raises(CraftVLAError, match="original head; the policy's is the Pro.*--policy.head.pro false"):
        load_vla_adapter_head(pro, path, state)
    path, state = _module_file(FIXTURE / "pro", "action_head")
    with pytest.raises(CraftVLAError, match="1 keys outside VLA-Adapter's head"):
        load_vla_adapter_head(pro, path, {**state, "proprio.fc1.weight": torch.zeros(1)})
    state.pop("model.mlp_resnet_blocks.3.film_gen.0.bias")  # unused by the forward, still required
    with pytest.raises(CraftVLAError, match="1 missing.*film_gen"):
        load_vla_adapter_head(pro, path, state)


def test_preceding_skips_instruction_padding():
    """[BOS][v v v][t t pad][q q][STOP]: the token before each vision token, and before each query
    (the first query's is the last real instruction token, not the padding)."""
    d = 2
    _, layout = build_sequence(
        torch.zeros(d),
        torch.zeros(1, 3, d),
        torch.zeros(1, 3, d),
        torch.tensor([[True, True, False]]),
        torch.zeros(2, d),
        torch.zeros(d),
    )
    assert layout.vision_index.tolist() == [[1, 2, 3]] and layout.query_index.tolist() == [[7, 8]]
    assert layout.preceding(layout.vision_index).tolist() == [[0, 1, 2]]
    assert layout.preceding(layout.query_index).tolist() == [[5, 7]]  # 6 is padding


def _policy(**head):
    torch.manual_seed(0)
    cfg = micro_config(head=VLAAdapterHeadConfig(**head))
    cfg.head.hidden_dim = None  # micro_config sets 32; this head is the LLM's width
    return VLAPolicy(cfg)


@pytest.mark.parametrize("streams", ["released", "tokens"])
def test_streams_read_the_positions_their_code_reads(streams):
    policy = _policy(streams=streams).eval()
    batch = policy.config.fake_batch(2)
    batch["task"] = ["open", "open the drawer please"]  # the first is padded
    with torch.no_grad():
        context = policy.encode(batch)
        read = policy.action_head.streams(context)
    n, q = context.layouts[0].num_vision, policy.config.num_action_queries
    text_len = context.layouts[0].text_mask.sum(dim=1)  # (B,)
    for layer, (adapter, task, mask) in enumerate(read, start=1):
        hidden = context.hidden_states[layer]
        assert mask is None and adapter.shape[1] == q + 1 and task.shape[1] == n
        if streams == "tokens":
            torch.testing.assert_close(task, hidden[:, 1 : 1 + n])
            torch.testing.assert_close(adapter[:, :q], context.queries(layer))
            continue
        torch.testing.assert_close(task, hidden[:, :n])  # [BOS] + every vision token but the last
        for b in range(2):
            last_text = n + int(text_len[b])  # position of the last real instruction token
            torch.testing.assert_close(adapter[b, 0], hidden[b, last_text])
            torch.testing.assert_close(adapter[b, 1:q], context.queries(layer)[b, : q - 1])


def test_training_noise_is_drawn_per_call_shared_by_the_batch_and_never_at_inference():
    policy = _policy()
    batch = policy.config.fake_batch(2)
    for key, value in batch.items():  # two identical samples
        batch[key] = value[:1].expand_as(value).clone() if torch.is_tensor(value) else [value[0]] * 2
    head = policy.action_head
    with torch.no_grad():
        context = policy.encode(batch)
        first, second = head(context), head(context)
        assert not torch.equal(first, second)  # a fresh draw each call
        torch.testing.assert_close(first[0], first[1])  # one draw for the whole batch
        assert torch.equal(head.sample(context), head.sample(context))  # inference: no noise
        policy.eval()
        assert torch.equal(head(context), head.sample(context))


def test_a_policy_with_the_head_learns_and_reads_pruned_layers():
    """Memorising 4 random chunks (without their input noise, which layer_norm1 scales to unit
    variance: with it the micro head stays near the mean predictor for 100 steps)."""
    policy = _policy(pro=True, input_noise_std=0.0)
    batch = policy.config.fake_batch(4, seed=3)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss, _ = policy(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    keep = lambda layer, hidden, lay: torch.tensor([[0, 3, 5], [1, 2, 7]]) if layer == 1 else None  # noqa: E731
    policy.eval()
    with torch.no_grad():
        context = policy.encode(policy.config.fake_batch(2), select=keep)
        adapter, task, _ = policy.action_head.streams(context)[1]  # layer 2: after the removal
        assert task.shape[1] == 3
        assert policy.action_head.sample(context).isfinite().all()


def test_soft_masked_task_tokens_are_not_read():
    """A task stream masked out entirely gives the chunk of a head given no task stream at all."""
    policy = _policy(streams="tokens").eval()
    with torch.no_grad():
        context = policy.encode(policy.config.fake_batch(2))
        streams = policy.action_head.streams(context)
        masked = [(a, t, torch.zeros(t.shape[:2], dtype=torch.bool)) for a, t, _ in streams]
        empty = [(a, t[:, :0], None) for a, t, _ in streams]
        x = torch.zeros(2, policy.config.chunk_size, policy.action_head.in_dim)
        torch.testing.assert_close(policy.action_head.model(x, masked), policy.action_head.model(x, empty))
        assert not torch.allclose(policy.action_head.model(x, masked), policy.action_head.model(x, streams))


def test_the_head_saves_and_loads_with_the_policy(tmp_path):
    policy = _policy().eval()
    batch = policy.config.fake_batch(2)
    policy.save_pretrained(tmp_path / "ckpt")
    again = VLAPolicy.from_pretrained(tmp_path / "ckpt").eval()
    assert again.config.head == policy.config.head
    torch.testing.assert_close(again.predict_action_chunk(batch), policy.predict_action_chunk(batch))


def test_width_and_head_count_are_checked():
    with pytest.raises(ConfigError, match="the vla_adapter head is the LLM's width"):
        VLAPolicy(micro_config(head=VLAAdapterHeadConfig(hidden_dim=32)))
    with pytest.raises(ConfigError, match="into an even head size"):
        cfg = micro_config(head=VLAAdapterHeadConfig(num_heads=64))
        cfg.head.hidden_dim = None
        VLAPolicy(cfg)
    with pytest.raises(ConfigError, match="head.streams"):
        VLAAdapterHeadConfig(streams="middle")


def test_pruning_config_composes():
    cfg = micro_config(
        head=VLAAdapterHeadConfig(),
        pruning=PruningConfig(merger="pool", merge_ratio=0.5, scorer="random", layers=[1], keep=[0.5]),
    )
    cfg.head.hidden_dim = None
    policy = VLAPolicy(dataclasses.replace(cfg)).eval()
    with torch.no_grad():
        chunk = policy.predict_action_chunk(cfg.fake_batch(2))
    assert chunk.shape == (2, cfg.chunk_size, cfg.action_dim) and chunk.isfinite().all()


def test_their_original_head_is_what_the_fixture_holds():
    """The fixture's files are what their finetune.py saves: an OrderedDict of bf16 tensors under `module.`."""
    raw = torch.load(FIXTURE / "pro/action_head--0_checkpoint.pt", weights_only=True)
    assert isinstance(raw, OrderedDict) and all(k.startswith("module.model.") for k in raw)
    assert {v.dtype for v in raw.values()} == {torch.bfloat16}
    assert sum(".film_gen." in k for k in raw) == 2 * 24  # stored by the release, unused by the forward


def test_lora_training_and_infer_on_raw_observations():
    from craftvla.model.peft import LoraConfig, apply_lora, is_lora_param

    from .test_processor import STATS, observation

    policy = _policy()
    apply_lora(policy, LoraConfig(rank=4, alpha=8.0))
    loss, _ = policy(policy.config.fake_batch(2))
    loss.backward()
    assert policy.action_head.model.fc1.weight.grad.abs().sum() > 0  # the head trains in full
    lora = [p.grad for n, p in policy.llm.named_parameters() if is_lora_param(n) and "lora_A" in n]
    assert lora and all(g is not None for g in lora)
    assert all(p.grad is None for n, p in policy.llm.named_parameters() if not is_lora_param(n))
    policy.eval().processor.set_stats(STATS, "test")
    chunk = policy.infer(observation())
    assert chunk.shape == (policy.config.chunk_size, policy.config.action_dim) and np.isfinite(chunk).all()
