#!/usr/bin/env bash
# The shipped generalist: the tiny preset trained on task set A (5 Meta-World tasks whose goals
# are visible at 64 px; scripted experts solve >= 96 %), evaluated on 20 unseen positions per task.
# Usage: assets/generalist/run.sh [WORK_DIR]     (a quiet 2-core CPU: ~45 min train + ~6 min eval)
# Writes WORK_DIR/{data,run,eval}; then copies the checkpoint, its log and results next to this file.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=${1:-runs/generalist}
TASKS=drawer-close-v3,button-press-topdown-v3,door-open-v3,handle-press-v3,plate-slide-v3
BIN=${BIN:-.venv/bin}
export MUJOCO_GL=egl
mkdir -p "$WORK"
[ -f "$WORK/data/meta/info.json" ] || \
  $BIN/craftvla collect --out "$WORK/data" --tasks $TASKS --episodes 50 --image_size 64 --cameras corner --seed 0
[ -e "$WORK/run/checkpoints/last" ] || \
  $BIN/craftvla train --preset tiny --dataset.root "$WORK/data" --output_dir "$WORK/run" \
    --steps ${STEPS:-4000} --batch_size 32 --optim.lr 1e-3 --dataset.num_workers 1 \
    --checkpoint.save_freq 200 --log.log_freq 10 --seed 0
$BIN/craftvla eval --checkpoint "$WORK/run/checkpoints/last" --tasks $TASKS --episodes 20 --seed 0 \
  --out "$WORK/eval" --overwrite true
rm -rf "$HERE/checkpoint" && mkdir -p "$HERE/checkpoint"
cp -r "$WORK"/run/checkpoints/last/. "$HERE/checkpoint/" && rm -rf "$HERE/checkpoint/training_state"
cp "$WORK/run/metrics.jsonl" "$HERE/train_metrics.jsonl"
cp "$WORK/run/train_config.yaml" "$HERE/train_config.yaml"
cp "$WORK/eval/results.json" "$HERE/eval_results.json"
