#!/usr/bin/env bash
# Tiny preset on Meta-World expert demonstrations: collect -> train (<= 20 min) -> closed-loop eval.
# Usage: benchmarks/train_metaworld/run.sh [WORK_DIR]   (needs a quiet 2-core CPU; ~30 min)
set -euo pipefail
WORK=${1:-runs/bench_train_metaworld}
TASKS=drawer-close-v3,button-press-topdown-v3,door-open-v3
BIN=${BIN:-.venv/bin}
export MUJOCO_GL=egl
mkdir -p "$WORK"
[ -f "$WORK/data/meta/info.json" ] || \
  $BIN/craftvla collect --out "$WORK/data" --tasks $TASKS --episodes 50 --image_size 64 --cameras corner --seed 0
$BIN/craftvla train --preset tiny --dataset.root "$WORK/data" --output_dir "$WORK/run" \
  --steps ${STEPS:-2300} --batch_size 32 --optim.lr 1e-3 --max_minutes 20 --dataset.num_workers 1 \
  --checkpoint.save_freq 100 --log.log_freq 10 --seed 0
$BIN/craftvla eval --checkpoint "$WORK/run/checkpoints/last" --tasks $TASKS --episodes 20 --seed 0 \
  --out "$WORK/eval" --overwrite true
