"""One SGD `train_step` on a fixed batch; run directly (1 process) or under torchrun (2 processes).

    python tests/train/grad_step.py OUT.pt [--accum N]
    torchrun --nproc_per_node 2 tests/train/grad_step.py OUT.pt

Each of W processes takes its 1/W share of the same 8-sample batch (split further into --accum
micro-batches); rank 0 saves the applied update (p_before - p_after) / lr, i.e. the averaged
gradient, so a test can compare 1 x 8, 1 x (2 x 4) and 2 x 4.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests.train` importable under torchrun

LR = 0.1


def main(out: str, accum: int) -> None:
    from accelerate.utils import set_seed

    from craftvla.model.policy import VLAPolicy
    from craftvla.train.loop import make_accelerator, train_step, unused_trainable_parameters
    from tests.train.conftest import train_config, unpadded_fake_batch

    set_seed(0)
    train_cfg = train_config(Path(out).parent / "run")
    cfg = train_cfg.policy
    policy = VLAPolicy(cfg)
    acc = make_accelerator(train_cfg, find_unused_parameters=bool(unused_trainable_parameters(policy)))
    batch = unpadded_fake_batch(cfg, 8, seed=1)
    share = 8 // acc.num_processes
    mine = {k: v[acc.process_index * share : (acc.process_index + 1) * share] for k, v in batch.items()}
    micro = [{k: v[i * share // accum : (i + 1) * share // accum] for k, v in mine.items()} for i in range(accum)]
    optimizer = torch.optim.SGD(policy.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer = acc.prepare(policy, optimizer)
    before = {n: p.detach().clone() for n, p in acc.unwrap_model(model).named_parameters()}
    metrics = train_step(model, micro, optimizer, scheduler, acc, grad_clip_norm=0.0)
    after = dict(acc.unwrap_model(model).named_parameters())
    if acc.is_main_process:
        grads = {n: (before[n] - after[n].detach()) / LR for n in before}
        torch.save({"grads": grads, "loss": metrics["loss"], "world": acc.num_processes}, out)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[2] == "--accum" else 1)
