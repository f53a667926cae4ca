#!/usr/bin/env python
"""Train an AUTOMATIC1111-style hypernetwork on a frozen Stable Diffusion model, with accelerate.

    accelerate launch train_hypernetwork.py \\
        --pretrained_model_name_or_path MODEL --train_data_dir DATA --output_dir OUT --max_train_steps 2000

Only the hypernetwork trains; the UNet, text encoders and VAE stay frozen. See README.md for the full guide.

The script is hypernet/scripts/train_hypernetwork.py, also installed as the command `hypernet-train`.
"""

import sys

from hypernet.scripts.train_hypernetwork import cli

if __name__ == "__main__":
    sys.exit(cli())
