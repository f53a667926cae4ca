#!/usr/bin/env bash
# Log loss, learning rate, gradient norm and preview images to Weights & Biases.
# Offline (no account needed; sync later with `wandb sync`): WANDB_MODE=offline bash examples/wandb.sh
set -euo pipefail
python "$(dirname "$0")/../train_hypernetwork.py" \
  --pretrained_model_name_or_path "${MODEL:-examples/demo-sd}" \
  --train_data_dir examples/style_dataset \
  --output_dir "${OUT:-quickstart/wandb-run}" \
  --resolution 64 --max_train_steps 20 --learning_rate 1e-3 \
  --report_to wandb --tracker_project_name hypernet --run_name quick-style \
  --preview_every 10 --preview_steps 10 --preview_prompt "a circle, art by wandb-run"
