#!/usr/bin/env bash
# The whole product in one command: install hypernet (and its test extras), train a hypernetwork on the style
# dataset shipped in examples/style_dataset with the small pretrained model in examples/demo-sd, generate the same
# prompts and seeds at multiplier 0 and 1, and lay them side by side with their style measure.
# About 3 minutes on 2 CPU cores. Everything lands in ./quickstart (or $OUT).
# QUICKSTART_NO_INSTALL=1 skips the two pip commands (for an environment that has them).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-quickstart}
MODEL=examples/demo-sd

if [ -z "${QUICKSTART_NO_INSTALL:-}" ]; then
  python -c "import torch" 2>/dev/null || pip install torch==2.13.0   # any torch build works; see README
  pip install -q -e ".[test,bnb]"   # with the test extras, so that `python -m pytest -q` runs next
fi

python train_hypernetwork.py \
  --pretrained_model_name_or_path "$MODEL" \
  --train_data_dir examples/style_dataset \
  --output_dir "$OUT/run" \
  --hypernetwork_name quick-style \
  --template_file examples/templates/style_filewords.txt \
  --layer_structure 1,2,1 --activation_func relu \
  --resolution 64 --train_batch_size 4 --max_train_steps 2000 --learning_rate "5e-3" \
  --save_every 500 --checkpointing_steps 500 --save_safetensors \
  --preview_every 500 --preview_steps 20 --preview_prompt "a red square at the bottom, art by quick-style"

for multiplier in 0 1; do
  python generate.py \
    --pretrained_model_name_or_path "$MODEL" \
    --prompts_file examples/quickstart_prompts.txt --num_images 4 \
    --hypernetwork "$OUT/run/quick-style.pt:$multiplier" \
    --seed 0 --num_inference_steps 20 --no_progress \
    --output_dir "$OUT/multiplier-$multiplier"
done

python examples/before_after.py "$OUT/multiplier-0" "$OUT/multiplier-1" \
  --train_data_dir examples/style_dataset --output "$OUT/before-after.png"

cat <<DONE

Quickstart finished. Besides the training run's files (listed above, after "wrote:"), it wrote:
  $OUT/before-after.png              4 prompts x 4 seeds at multiplier 0 (the base model) and 1, each with its figure
  $OUT/before-after.json             those figures (colour distance to the style) and the means printed above
  $OUT/multiplier-0/, multiplier-1/  generate.py's images (PNG with the webui's infotext) and grid-00000.png
DONE
