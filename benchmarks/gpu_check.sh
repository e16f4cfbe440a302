#!/usr/bin/env bash
# The one short script to run on a lent GPU machine (about 10 minutes): CUDA smoke
# test, then the SD2.1-base training-step benchmark. Results land in
# benchmarks/results/ (and in $OUT when it is set, so they come back).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e . 2>/dev/null || true
export PYTHONUNBUFFERED=1
python benchmarks/cuda_smoke.py 2>&1 | tee benchmarks/results/cuda_smoke.log
python benchmarks/train_step.py --device cuda --steps 10 --gen-steps 20 2>&1 | tail -30
if [ -n "${OUT:-}" ]; then cp benchmarks/results/train_step-cuda.* benchmarks/results/cuda_smoke.log "$OUT"/; fi
