#!/usr/bin/env bash
# Move hypernetworks between the webui's .pt and safetensors, and look inside one.
set -euo pipefail
IN=${IN:-quickstart/run/quick-style.pt}
python "$(dirname "$0")/../convert.py" "$IN" quickstart/converted/quick-style.safetensors --overwrite
python "$(dirname "$0")/../convert.py" quickstart/converted/quick-style.safetensors quickstart/converted/quick-style-fp16.pt --dtype fp16 --overwrite
python "$(dirname "$0")/../convert.py" --info quickstart/converted/quick-style-fp16.pt
