#!/usr/bin/env bash
# The GPU figures in bench/RESULTS.md: SD 1.5 architecture (random weights), 512x512.
# Run from the repository root on a CUDA machine with hypernet's dependencies installed; writes JSON lines to $1.
# Each training line has the eager and the compiled (--torch_compile: regional compilation) floor and hypernet
# steps side by side, with the GPU's busy time per step (torch.profiler's kernel time) beside the wall time.
set -euo pipefail
out=${1:-bench-gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
for dtype in fp16 bf16; do
  for batch in 1 4; do
    python3 bench/bench_train.py --preset sd15 --resolution 512 --steps 10 --warmup 2 --dtype "$dtype" \
      --batch_size "$batch" --torch_compile --no_lora | tee -a "$out/train.jsonl"
  done
  python3 bench/bench_train.py --preset sd15 --resolution 512 --steps 10 --warmup 2 --dtype "$dtype" \
    --gradient_checkpointing --use_8bit_adam | tee -a "$out/train.jsonl"
done
python3 bench/bench_generate.py --preset sd15 --resolution 512 --rounds 3 --dtype fp16 --torch_compile \
  | tee -a "$out/generate.jsonl"
