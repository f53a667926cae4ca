#!/usr/bin/env bash
# A style hypernetwork on Stable Diffusion 1.5 with A1111's usual settings, on one GPU.
#   MODEL=path/to/stable-diffusion-v1-5 DATA=path/to/images bash examples/recipe_sd15.sh
set -euo pipefail
accelerate launch --config_file examples/accelerate/1gpu_fp16.yaml train_hypernetwork.py \
  --pretrained_model_name_or_path "${MODEL:?set MODEL to a local SD 1.5 diffusers folder}" \
  --train_data_dir "${DATA:?set DATA to a folder of images with .txt captions}" \
  --output_dir "${OUT:-outputs/sd15-style}" \
  --hypernetwork_name "${NAME:-my-style}" \
  --template_file examples/templates/style_filewords.txt \
  --layer_structure 1,2,1 --activation_func relu --weight_init Normal \
  --resolution 512 --train_batch_size 1 --gradient_accumulation_steps 1 \
  --learning_rate "5e-5:100, 5e-6:1500, 5e-7:10000, 5e-8" \
  --max_train_steps 10000 \
  --clip_grad_mode norm --clip_grad_value 1.0 \
  --latent_sampling_method once \
  --save_every 500 --preview_every 500 --checkpointing_steps 500 --checkpoints_total_limit 2 \
  --preview_prompt "a castle on a hill, art by ${NAME:-my-style}" --preview_steps 20 --preview_seed 1
