"""`craftvla prune train` stages 1 and 2 and `prune eval` on a micro policy and a tiny dataset."""

import json

import pytest
import torch

from craftvla.prune.train import PruneTrainConfig, StagePlugin, prepare_policy, run
from craftvla.train.config import DatasetConfig, LogConfig
from tests.train.conftest import micro_policy_config, write_tiny_dataset


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from craftvla.model.policy import VLAPolicy

    root = tmp_path_factory.mktemp("prune")
    data = write_tiny_dataset(root / "data")
    torch.manual_seed(0)
    cfg = micro_policy_config().for_dataset([("observation.images.corner")], 4, 4)
    policy = VLAPolicy(cfg)
    policy.save_pretrained(root / "policy")
    return root, data


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _train(root, data, stage, init_from=None, out=None, **kw):
    out = out or root / f"s{stage}"
    cfg = PruneTrainConfig(
        init_from=str(init_from or root / ("policy" if stage == 1 else "s1/checkpoints/last")),
        dataset=DatasetConfig(root=str(data)),
        stage=stage,
        output_dir=str(out),
        steps=4,
        batch_size=4,
        log=LogConfig(log_freq=1, progress=False, plots=False),
        hidden_dim=16,
        **kw,
    )
    run(cfg)
    return out


def test_stages_train_only_their_parts_and_eval_reports(setup, capsys):
    root, data = setup
    s1 = _train(root, data, 1)
    before, after = _weights(root / "policy"), _weights(s1 / "checkpoints" / "last")
    merger = [k for k in after if k.startswith("pruning.merger.")]
    assert merger and all(k not in before for k in merger)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the policy stayed frozen
    rows = [json.loads(x) for x in (s1 / "metrics.jsonl").read_text().splitlines()]
    assert all("prune/merge_sparsity" in r and r["prune/tokens/merged"] == 8.0 for r in rows)

    s2 = _train(root, data, 2, objective="adversarial")
    stage2 = _weights(s2 / "checkpoints" / "last")
    assert all(torch.equal(after[k], stage2[k]) for k in after)  # merger and policy unchanged
    heads = [k for k in stage2 if k.startswith("pruning.pruner.heads.")]
    assert {k.split(".")[3] for k in heads} == {"1"}  # 2-layer LLM: the default schedule prunes after layer 1
    rows = [json.loads(x) for x in (s2 / "metrics.jsonl").read_text().splitlines()]
    temps = [r["temperature"] for r in rows]
    assert temps[0] == pytest.approx(1.0) and all(a > b for a, b in zip(temps, temps[1:]))
    assert all({"adv_loss", "disc/real_loss", "disc/fake_loss", "task_loss", "prune/keep/1"} <= set(r) for r in rows)

    from craftvla.cli import main

    out = root / "eval.json"
    code = main(
        [
            "prune",
            "eval",
            "--checkpoint",
            str(s2 / "checkpoints" / "last"),
            "--dataset",
            str(data),
            "--samples",
            "8",
            "--repeats",
            "3",
            "--warmup",
            "1",
            "--batch_sizes",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert set(report["task_l1"]) == {"unpruned", "soft", "hard"}
    assert report["task_l1"]["soft"] == pytest.approx(report["task_l1"]["hard"], abs=1e-5)
    assert report["tokens"]["vision_tokens_per_layer"] == [8, 8, 4]  # 16 patches merged to 8, half kept after layer 1
    assert report["speed"]["batch_1"]["flops_ratio"] < 1.0


def test_three_optimizers_each_with_its_own_lr(setup):
    """One stage-2 step with the merger also training: AdamW's first step moves every parameter with a
    gradient by lr x sign(grad) (no weight decay on biases), so each part shows its own LR."""
    from craftvla.model.policy import VLAPolicy
    from craftvla.train.config import OptimConfig, TrainConfig
    from craftvla.train.loop import make_accelerator, train_step
    from craftvla.train.optim import build_optimizer

    root, data = setup
    if not (root / "s1" / "checkpoints" / "last").exists():
        _train(root, data, 1)
    cfg = PruneTrainConfig(
        init_from=str(root / "s1/checkpoints/last"),
        dataset=DatasetConfig(root=str(data)),
        stage=2,
        steps=10,
        train_merger=True,
        merger_lr=1e-3,
        pruner_lr=3e-3,
        disc_lr=5e-4,
        hidden_dim=16,
        objective="adversarial",  # the discriminator is the third optimizer
    )
    torch.manual_seed(0)
    policy = VLAPolicy.from_pretrained(cfg.init_from)
    lrs = prepare_policy(cfg)(policy)
    accelerator = make_accelerator(TrainConfig())
    optimizer = build_optimizer(policy, OptimConfig(lr=cfg.pruner_lr), lrs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    plugin = StagePlugin(policy, cfg, accelerator)
    policy.train()
    frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    parts = {
        "merger": (policy.pruning.merger, 1e-3),
        "pruner": (policy.pruning.pruner, 3e-3),
        "disc": (plugin.disc, 5e-4),
    }
    start = {name: [p.detach().clone() for p in mod.parameters()] for name, (mod, _) in parts.items()}
    batch = micro_policy_config().for_dataset(["observation.images.corner"], 4, 4).fake_batch(4)
    train_step(policy, [batch], optimizer, scheduler, accelerator, 0.0, plugin)
    for name, (module, lr) in parts.items():
        steps = torch.cat(
            [(p.detach() - p0).flatten() for p, p0 in zip(module.parameters(), start[name]) if p.ndim < 2]
        )
        moved = steps[steps != 0].abs()  # |grad| >> eps: exactly lr; tiny gradients move less, never more
        assert len(moved) > 0 and float(moved.max()) == pytest.approx(lr, rel=1e-3), name
        assert float(moved.median()) == pytest.approx(lr, rel=1e-2), name
    assert all(torch.equal(p, frozen[n]) for n, p in policy.named_parameters() if n in frozen)


@pytest.mark.parametrize("merger", ["learned_window", "learned_tome"])
def test_stage_one_trains_the_window_and_set_mergers_from_their_start(setup, merger):
    root, data = setup
    out = _train(root, data, 1, out=root / f"s1_{merger}", merger=merger)
    weights = _weights(out / "checkpoints" / "last")
    assert weights["pruning.merger.scores.score.weight"].abs().sum() > 0  # it started at zero: pooling
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["prune/merge_sparsity"] == pytest.approx(1.0)  # pool's windows / ToMe's sets at the first step


@pytest.mark.parametrize(
    "merger, learned",
    [
        ("learned_window", "pruning.tower_pool.scores.0.score.weight"),
        ("learned_v2", "pruning.tower_pool.dense.queries"),
        ("learned_tome", "pruning.tower_pool.scores.0.score.weight"),
    ],
)
def test_stage_one_trains_a_learned_merge_inside_the_towers(setup, merger, learned):
    from craftvla.config import PruningConfig
    from craftvla.errors import ConfigError
    from craftvla.model.policy import VLAPolicy
    from craftvla.prune.train import resolve_pruning

    root, data = setup
    torch.manual_seed(0)
    cfg = micro_policy_config().for_dataset([("observation.images.corner")], 4, 4)
    assert cfg.head.flat_readout  # the read-out reads each patch's merged token: the task loss reaches the merge
    VLAPolicy(cfg).save_pretrained(root / f"policy_{merger}")
    towers = {"vision_merge_ratio": 0.25, "vision_merger": merger}
    out = _train(root, data, 1, init_from=root / f"policy_{merger}", out=root / f"s1_towers_{merger}", **towers)
    before, after = _weights(root / f"policy_{merger}"), _weights(out / "checkpoints" / "last")
    assert after[learned].abs().sum() > 0  # it started at zero: pooling
    assert all(torch.equal(before[k], after[k]) for k in before)  # the policy stayed frozen
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["prune/tokens/input"] == 4.0 and 0.0 < rows[0]["prune/merge_sparsity"] <= 1.0
    if merger != "learned_v2":
        assert rows[0]["prune/merge_sparsity"] == pytest.approx(1.0)  # uniform windows / sets at the first step
    plain = PruningConfig(vision_merge_ratio=0.25)  # nothing learned to train in stage 1
    with pytest.raises(ConfigError, match="learned_window"):
        resolve_pruning(PruneTrainConfig(stage=1, init_from="x"), plain)
