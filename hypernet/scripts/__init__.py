"""The scripts behind the commands: train_hypernetwork (hypernet-train), generate (hypernet-generate) and convert
(hypernet-convert), each argparse -> main() in the diffusers example style. The files of the same names at the top
of a checkout run them (`python train_hypernetwork.py`, `accelerate launch train_hypernetwork.py`). The library
(the rest of the package) never imports them."""

import argparse


class HelpFormatter(argparse.HelpFormatter):
    """--help with every flag's default beside its help, where it has one that its help does not already state."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default == [] or default == argparse.SUPPRESS
        if not action.option_strings or unset or "default" in text.lower():
            return text
        return f"{text} (default: %(default)s)"
