#!/usr/bin/env bash
# Held-out action L1 of the committed tiny-256 base at 1/16 and 1/32 of its 256 vision tokens, per method
# (no closed loop): does anything bend there? Writes runs/pruning-probe/<method>_b<budget>.json; resumable.
#   bash benchmarks/pruning/probe_low_budgets.sh        (about 15 min at one thread)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
BASE=benchmarks/pruning/base_policy
OUT=runs/pruning-probe
mkdir -p "$OUT"
[ -f "$OUT/held/meta/info.json" ] || $PY -m craftvla collect --out "$OUT/held" --image_size 128 --seed 500 \
  --tasks drawer-close-v3,button-press-topdown-v3,handle-press-v3 --episodes 10
for b in 0.0625 0.03125; do
  k2=$(python3 -c "print(2 * $b)")
  for spec in "pool:--merger pool --merge_ratio $b" "tome:--merger tome --merge_ratio $b" \
    "pool_vit:--vision_merge_ratio $b" "random:--scorer random --keep $k2,$b" "fastv:--scorer fastv --keep $k2,$b"; do
    name=${spec%%:*}
    # shellcheck disable=SC2086
    [ -f "$OUT/${name}_b$b.json" ] || $PY -m craftvla prune eval --checkpoint $BASE ${spec#*:} --dataset "$OUT/held" \
      --samples 512 --batch_sizes 1 --repeats 3 --warmup 1 --threads 1 --out "$OUT/${name}_b$b.json"
  done
done
