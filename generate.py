#!/usr/bin/env python
"""Text-to-image with hypernetworks stacked at chosen multipliers.

    python generate.py --pretrained_model_name_or_path MODEL --prompt "a castle" \\
        --hypernetwork style.pt:0.8 --hypernetwork detail.safetensors:0.5 --output_dir out

A1111's prompt syntax works too: "<hypernet:style:0.8> a castle" loads style.pt or style.safetensors from
--hypernetwork_dir. Every PNG carries its parameters as A1111 infotext, readable in the webui's PNG Info.

The script is hypernet/scripts/generate.py, also installed as the command `hypernet-generate`.
"""

import sys

from hypernet.scripts.generate import cli

if __name__ == "__main__":
    sys.exit(cli())
