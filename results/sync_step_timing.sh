#!/bin/bash
# issue 27: the training step before (9af2b88, a host sync every step) and after (the guard reads back every 20 steps)
export CIFAR10_DIR=/work/shared/data/cifar10-jpg NO_ALBUMENTATIONS_UPDATE=1 SMOKE_TEST=0
for round in 1 2; do
  for tree in before main; do
    cd /work/$tree && PYTHONPATH=/work/$tree python benchmarks/benchmark.py --device cpu --threads 2 --skip data,eval \
      --models resnet9 --precisions bf16 --layouts channels_last --train-batch 256 --min-run-time 8 \
      --out /work/runs/sync_bench_$tree.jsonl > /dev/null 2>> /work/runs/sync_bench.err
  done
done
