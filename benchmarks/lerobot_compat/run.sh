#!/usr/bin/env bash
# craftvla-written LeRobot v3.0 datasets opened by the real lerobot library (evidence, not a CI
# test: lerobot pins torch < 2.11, so it lives in its own throw-away environment).
#   LEROBOT_PY=/tmp/lr/bin/python bash benchmarks/lerobot_compat/run.sh
# LEROBOT_PY: a Python with lerobot==0.4.4 torch==2.9.1 torchvision==0.24.1 "torchcodec==0.9.*"
# (and Debian's ffmpeg for torchcodec); see tests/data/fixtures/lerobot_v30/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-runs/lerobot_compat}
.venv/bin/python benchmarks/lerobot_compat/write_ours.py --out "$OUT"
"${LEROBOT_PY:?set LEROBOT_PY to a python with lerobot installed}" benchmarks/lerobot_compat/read_with_lerobot.py \
    --out "$OUT" --results benchmarks/lerobot_compat/results.json
