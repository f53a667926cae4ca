#!/usr/bin/env bash
# A style hypernetwork on SDXL at 1024x1024, on one GPU with bf16 (the SDXL VAE overflows in fp16: give a VAE that is
# stable in fp16 with VAE=..., e.g. a local copy of madebyollin/sdxl-vae-fp16-fix, or keep bf16).
#   MODEL=path/to/stable-diffusion-xl-base-1.0 DATA=path/to/images bash examples/recipe_sdxl.sh
set -euo pipefail
vae=()
if [ -n "${VAE:-}" ]; then vae=(--pretrained_vae_model_name_or_path "$VAE"); fi
accelerate launch --mixed_precision bf16 train_hypernetwork.py \
  --pretrained_model_name_or_path "${MODEL:?set MODEL to a local SDXL diffusers folder}" "${vae[@]}" \
  --train_data_dir "${DATA:?set DATA to a folder of images with .txt captions}" \
  --output_dir "${OUT:-outputs/sdxl-style}" \
  --hypernetwork_name "${NAME:-my-xl-style}" \
  --template_file examples/templates/style_filewords.txt \
  --layer_structure 1,2,1 --activation_func linear \
  --resolution 1024 --train_batch_size 1 --gradient_accumulation_steps 4 --gradient_checkpointing \
  --mixed_precision bf16 --use_8bit_adam \
  --learning_rate "2e-5:200, 5e-6:2000, 1e-6" --max_train_steps 4000 \
  --clip_grad_mode norm --clip_grad_value 1.0 --snr_gamma 5 \
  --cache_dir "${CACHE:-outputs/latent-cache}" \
  --save_every 250 --preview_every 250 --checkpointing_steps 250 --checkpoints_total_limit 2 \
  --preview_prompt "a castle on a hill, art by ${NAME:-my-xl-style}" --preview_steps 25 --preview_seed 1
