#!/usr/bin/env python
"""Text-to-image with hypernetworks stacked at chosen multipliers.

Runs hypernet/scripts/generate.py (its docstring and --help give the usage), also installed as the command
`hypernet-generate`.
"""

import sys

from hypernet.scripts.generate import cli

if __name__ == "__main__":
    sys.exit(cli())
