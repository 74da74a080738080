"""Worker for test_ddp.py, run as `torchrun --standalone --nproc_per_node 2 ddp_worker.py OUT.json [K]`
(K: --craft.retention_every; with 2 the compared step reuses the warm-up step's g_ret and L_ret).

Each rank first computes the single-process reference on the combined batch (before the process
group exists, so no collective runs), then the same step as one of two gloo ranks on its half.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from _common import batch, small_policy, split, train_steps  # noqa: E402

from craftvla.craft.config import CraftConfig  # noqa: E402
from craftvla.craft.plugin import CraftPlugin  # noqa: E402


def one_step(policy, plugin, batches):
    """A warm-up step (so features drift from anchors), then one step on `batches`; -> grads, log."""
    train_steps(policy, plugin, [[batch(2, seed=11)]], lr=0.05)
    for mb in batches:
        plugin.backward(policy, mb, 1.0 / len(batches))
    plugin.before_optimizer_step()
    grads = torch.cat([p.grad.flatten() for p in plugin.params])
    return grads, plugin.after_optimizer_step()


def main(out_path: str, retention_every: int) -> None:
    cfg = CraftConfig(enabled=True, dual_lr=1.0, log_freq=1, retention_every=retention_every)
    full = batch(8, seed=5)
    ref = small_policy()
    ref_grads, ref_log = one_step(ref, CraftPlugin(ref, cfg), [full])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    policy = small_policy()
    mine = split(full, 4 * rank, 4 * rank + 4)
    grads, log = one_step(policy, CraftPlugin(policy, cfg), [split(mine, 0, 2), split(mine, 2, 4)])
    if rank == 0:
        result = {
            "max_abs_diff": (grads - ref_grads).abs().max().item(),
            "grad_scale": ref_grads.abs().max().item(),
            "log": log,
            "ref_log": ref_log,
        }
        with open(out_path, "w") as fh:
            json.dump(result, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1)
