"""Does a policy's action depend on the LLM's vision tokens at all? (If not, no pruning can matter.)

    .venv/bin/python benchmarks/pruning/probe_vision_path.py CHECKPOINT HELDOUT_DATASET --out probe.json

On held-out frames: the head's vision gates tanh(g); the action L1 unpruned and with random vision
tokens kept after LLM layers 1 and 2 (down to one token), with the largest and mean change of the
predicted (normalised) actions; and, for a head with a flat read-out, the L1 when that read-out is
replaced by its mean over the frames (what the read-out alone carries).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _lib import write_json  # noqa: E402

KEEPS = ([0.5, 0.25], [0.1, 0.02], [0.01, 0.004])


def probe(checkpoint: str, heldout: str, samples: int) -> dict:
    from craftvla.config import PruningConfig
    from craftvla.craft.data import calibration_batches, open_anchor_dataset
    from craftvla.model.policy import VLAPolicy
    from craftvla.prune.module import apply_pruning

    def load(pruning=None):
        policy = VLAPolicy.from_pretrained(checkpoint)
        if pruning is not None:
            apply_pruning(policy, pruning)
        return policy.eval()

    base = load()
    batch = next(iter(calibration_batches(open_anchor_dataset(heldout, base), samples, seed=0)))

    @torch.no_grad()
    def run(policy) -> tuple[float, torch.Tensor]:  # (L1, actions (B, H, A))
        return float(policy(batch)[0]), policy.action_head(policy.encode(batch))

    l1, actions = run(base)
    out = {
        "checkpoint": checkpoint,
        "samples": samples,
        "l1_unpruned": l1,
        "gates": [float(torch.tanh(b.gate.detach())) for b in getattr(base.action_head, "blocks", [])],
        "random_keep": [],
    }
    for keep in KEEPS:
        torch.manual_seed(0)
        l1_k, actions_k = run(load(PruningConfig(scorer="random", layers=[1, 2], keep=list(keep))))
        change = (actions_k - actions).abs()
        out["random_keep"].append(
            {
                "keep": list(keep),
                "l1": l1_k,
                "max_action_change": float(change.max()),
                "mean_action_change": float(change.mean()),
            }
        )
    flat = getattr(base.action_head, "flat", None)
    if flat is not None:  # the read-out replaced by its mean over the frames
        read = flat.forward
        flat.forward = lambda tokens: read(tokens).mean(0, keepdim=True).expand(tokens.shape[0], -1, -1)
        out["l1_flat_readout_averaged"] = run(base)[0]
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="probe_vision_path.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("heldout")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    result = probe(args.checkpoint, args.heldout, args.samples)
    write_json(args.out, result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
