"""Quiet by default: the libraries hypernet runs on report errors only, and show no loading bars, unless a script's
--verbose asks for everything they say."""

import logging
import os
import warnings

LIBRARIES = ("accelerate", "bitsandbytes", "diffusers", "huggingface_hub", "torch.distributed", "transformers")


def quiet_libraries():
    """Before the libraries load: their loggers at ERROR, their progress bars off, deprecation notices hidden."""
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    for variable in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(variable, "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import diffusers.utils.logging
    import huggingface_hub.utils
    import transformers.utils.logging

    for library in (diffusers.utils.logging, transformers.utils.logging):  # their loading bars
        library.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
