#!/usr/bin/env python
"""Convert hypernetworks between A1111's .pt and safetensors, and inspect them.

Runs hypernet/scripts/convert.py (its docstring and --help give the usage), also installed as the command
`hypernet-convert`.
"""

import sys

from hypernet.scripts.convert import cli

if __name__ == "__main__":
    sys.exit(cli())
