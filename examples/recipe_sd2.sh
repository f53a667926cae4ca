#!/usr/bin/env bash
# A hypernetwork on Stable Diffusion 2.x (768-v, v-prediction: the script reads the target from the scheduler).
#   MODEL=path/to/stable-diffusion-2-1 DATA=path/to/images bash examples/recipe_sd2.sh
set -euo pipefail
accelerate launch --config_file examples/accelerate/1gpu_fp16.yaml train_hypernetwork.py \
  --pretrained_model_name_or_path "${MODEL:?set MODEL to a local SD 2.x diffusers folder}" \
  --train_data_dir "${DATA:?set DATA to a folder of images with .txt captions}" \
  --output_dir "${OUT:-outputs/sd2-style}" \
  --template_file examples/templates/style_filewords.txt \
  --layer_structure 1,2,1 --activation_func linear \
  --resolution 768 --gradient_checkpointing \
  --learning_rate 5e-6 --lr_scheduler constant_with_warmup --lr_warmup_steps 100 \
  --snr_gamma 5 --max_train_steps 8000 \
  --save_every 500 --preview_every 500 --checkpointing_steps 500
