#!/usr/bin/env python
"""Train an AUTOMATIC1111-style hypernetwork on a frozen Stable Diffusion model, with accelerate.

Runs hypernet/scripts/train_hypernetwork.py (its docstring and --help give the usage), also installed as the command
`hypernet-train`.
"""

import sys

from hypernet.scripts.train_hypernetwork import cli

if __name__ == "__main__":
    sys.exit(cli())
