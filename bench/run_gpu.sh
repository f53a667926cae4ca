#!/usr/bin/env bash
# The GPU figures in bench/RESULTS.md: SD 1.5 architecture (random weights), 512x512, batch 1.
# Run from the repository root on a CUDA machine with hypernet's dependencies installed; writes JSON lines to $1.
set -euo pipefail
out=${1:-bench-gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
for dtype in fp16 bf16; do
  for gc in "" "--gradient_checkpointing"; do
    python3 bench/bench_train.py --preset sd15 --resolution 512 --steps 10 --warmup 2 --dtype "$dtype" $gc \
      --use_8bit_adam | tee -a "$out/train.jsonl"
  done
done
python3 bench/bench_generate.py --preset sd15 --resolution 512 --rounds 3 --dtype fp16 | tee -a "$out/generate.jsonl"
