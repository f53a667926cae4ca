#!/usr/bin/env python
"""Convert hypernetworks between A1111's .pt and safetensors, and inspect them.

    python convert.py style.pt style.safetensors          # format by suffix
    python convert.py style.safetensors style.pt --dtype fp16
    python convert.py hypernetworks/ converted/ --to safetensors   # every file in a folder
    python convert.py --info style.pt [--json]

Every conversion is verified before it is reported: the written file is read back and its outputs are compared with
the input's on a random context for every width; they must be equal (fp32) or within the stated tolerance
(fp16/bf16). The optimizer state companion (FILE.optim) is carried along with its hash recomputed for the new file.

The script is hypernet/scripts/convert.py, also installed as the command `hypernet-convert`.
"""

import sys

from hypernet.scripts.convert import cli

if __name__ == "__main__":
    sys.exit(cli())
