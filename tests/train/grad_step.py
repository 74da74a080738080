"""One SGD `train_step` on a fixed batch; run directly (1 process) or under torchrun (2 processes).

    python tests/train/grad_step.py OUT.pt [--accum N] [--craft] [--clip C]
    torchrun --nproc_per_node 2 tests/train/grad_step.py OUT.pt [--craft] [--clip C]

Each of W processes takes its 1/W share of the same 8-sample batch (split further into --accum
micro-batches); rank 0 saves the applied update (p_before - p_after) / lr, i.e. the averaged
gradient, so a test can compare 1 x 8, 1 x (2 x 4) and 2 x 4. With --craft the step goes through
the CRaFT plug-in, after one earlier step (same split) so that the features have drifted from
the anchors and the surgery has something to do; the measured update is the second one. --clip C clips the
measured step's gradient norm to C (0 = off) and saves the norm the step logged.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests.train` importable under torchrun

LR = 0.1


def _shares(batch: dict, acc, accum: int) -> list[dict]:
    """This rank's 1/W share of the batch, split into `accum` micro-batches."""
    share = 8 // acc.num_processes
    mine = {k: v[acc.process_index * share : (acc.process_index + 1) * share] for k, v in batch.items()}
    return [{k: v[i * share // accum : (i + 1) * share // accum] for k, v in mine.items()} for i in range(accum)]


def main(out: str, accum: int, craft: bool = False, clip: float = 0.0) -> None:
    from accelerate.utils import set_seed

    from craftvla.model.policy import VLAPolicy
    from craftvla.train.loop import make_accelerator, make_craft_plugin, train_step, unused_trainable_parameters
    from tests.train.conftest import train_config, unpadded_fake_batch

    set_seed(0)
    flags = ["--craft.enabled", "true", "--craft.log_freq", "1", "--craft.dual_lr", "1.0"] if craft else []
    train_cfg = train_config(Path(out).parent / "run", *flags)
    cfg = train_cfg.policy
    policy = VLAPolicy(cfg)
    acc = make_accelerator(train_cfg, find_unused_parameters=bool(unused_trainable_parameters(policy)))
    optimizer = torch.optim.SGD(policy.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer = acc.prepare(policy, optimizer)
    plugin = make_craft_plugin(acc.unwrap_model(model), train_cfg, acc)
    if craft:
        warm = _shares(unpadded_fake_batch(cfg, 8, seed=2), acc, accum)
        train_step(model, warm, optimizer, scheduler, acc, grad_clip_norm=0.0, grad_plugin=plugin)
    micro = _shares(unpadded_fake_batch(cfg, 8, seed=1), acc, accum)
    before = {n: p.detach().clone() for n, p in acc.unwrap_model(model).named_parameters()}
    metrics = train_step(model, micro, optimizer, scheduler, acc, grad_clip_norm=clip, grad_plugin=plugin)
    after = dict(acc.unwrap_model(model).named_parameters())
    if acc.is_main_process:
        grads = {n: (before[n] - after[n].detach()) / LR for n in before}
        craft_log = {k: torch.tensor(v) for k, v in metrics.items() if k.startswith("craft/")}
        torch.save(
            {
                "grads": grads,
                "loss": metrics["loss"],
                "world": acc.num_processes,
                "craft": craft_log,
                "grad_norm": torch.as_tensor(metrics["grad_norm"]).float(),
            },
            out,
        )
    acc.wait_for_everyone()


def parse_flags(args) -> tuple[int, bool, float]:
    """(accum, craft, clip) from [--accum N] [--craft] [--clip C]."""
    accum = int(args[args.index("--accum") + 1]) if "--accum" in args else 1
    return accum, "--craft" in args, float(args[args.index("--clip") + 1]) if "--clip" in args else 0.0


if __name__ == "__main__":
    main(sys.argv[1], *parse_flags(sys.argv[2:]))
