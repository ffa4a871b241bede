#!/usr/bin/env bash
# The one prepared GPU call: set up a bare GPU machine, then results/gpu_run.py (see its
# docstring for the parts). From the checkout's root, with .device/ prepared as
# ../shared/device/README.md says (wheels, setup.sh, the dataset archive) plus the airbench
# wheel (pip wheel --no-deps airbench==0.1.8 -w .device/wheels):
#   device run, carry .device:  GIT_COMMIT=<sha> VGG="batch_size=16 batch_size=64,optimizer=adam" [ONLY="vgg"] bash results/gpu_run.sh
# Results go to $OUT (the device tool's folder; default artifacts/gpu): gpu_runs.json, gpu_run.log.
# On a CPU, a smoke check of the same script:  SMOKE_TEST=1 bash results/gpu_run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-artifacts/gpu}
mkdir -p "$OUT"
if [ -f .device/setup.sh ] && [ -d .device/wheels ] && command -v nvidia-smi >/dev/null; then   # the GPU machine
  bash .device/setup.sh
  export PYTHONPATH=/tmp/site:$PWD CIFAR10_DIR=$PWD/data/cifar10-jpg
fi
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 results/gpu_run.py --out "$OUT/gpu_runs.json" --budget "${BUDGET:-480}" \
  ${VGG:+--vgg $VGG} ${ONLY:+--only $ONLY} 2>&1 | tee "$OUT/gpu_run.log"
