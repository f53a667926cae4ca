#!/usr/bin/env bash
# The whole product in one command: install hypernet (and its test extras), build a tiny random-weight Stable Diffusion, train a
# hypernetwork on the style dataset shipped in examples/style_dataset, and generate a before/after pair.
# Under 5 minutes on 2 CPU cores. Everything lands in ./quickstart (or $OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-quickstart}

python -c "import torch" 2>/dev/null || pip install torch==2.13.0   # any torch build works; see README
pip install -q -e ".[test,bnb]"   # with the test extras, so that `python -m pytest -q` runs next

python examples/make_tiny_model.py --output_dir "$OUT/tiny-sd"

python train_hypernetwork.py \
  --pretrained_model_name_or_path "$OUT/tiny-sd" \
  --train_data_dir examples/style_dataset \
  --output_dir "$OUT/run" \
  --hypernetwork_name quick-style \
  --template_file examples/templates/style_filewords.txt \
  --layer_structure 1,2,1 --activation_func relu \
  --resolution 64 --train_batch_size 4 --max_train_steps 300 --learning_rate "2e-3:200, 1e-3" \
  --save_every 100 --checkpointing_steps 100 --save_safetensors \
  --preview_every 100 --preview_steps 10 --preview_prompt "a teal star, art by quick-style"

for strength in 0 1; do
  python generate.py \
    --pretrained_model_name_or_path "$OUT/tiny-sd" \
    --prompt "a teal star, art by quick-style" \
    --hypernetwork "$OUT/run/quick-style.pt:$strength" \
    --seed 7 --num_inference_steps 20 --no_progress \
    --output_dir "$OUT/strength-$strength"
done

cat <<DONE

Quickstart finished. What it wrote:
  $OUT/tiny-sd/                      the random-weight Stable Diffusion it trained on (diffusers folder)
  $OUT/run/quick-style.pt            the hypernetwork (A1111 .pt: webui, ComfyUI) and its .pt.optim
  $OUT/run/quick-style.safetensors   the same weights as safetensors
  $OUT/run/loss.png, loss.csv        the loss per step: it falls, and that is the proof of training
  $OUT/run/images/                   preview images every 100 steps
  $OUT/run/hypernetworks/            quick-style-100.pt, -200.pt, -300.pt snapshots
  $OUT/run/checkpoint-300/           the state to continue exactly with --resume_from_checkpoint latest
  $OUT/strength-0/00000-7.png        before: the base model alone (strength 0)
  $OUT/strength-1/00000-7.png        after: the same seed with the hypernetwork at strength 1
The base model has random weights, so the images show the mechanics, not a learned style.
DONE
