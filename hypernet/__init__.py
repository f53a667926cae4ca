"""AUTOMATIC1111-style hypernetworks for diffusers: the module, the file formats, attaching to a UNet."""

from .attachment import Attachment, apply_hypernetworks, attach, attention_widths, compile_blocks
from .errors import FormatError, HypernetError, NotAHypernetworkError, UsageError, WidthMismatchError
from .formats import load, save, shorthash
from .module import SD1_WIDTHS, SD2_WIDTHS, SDXL_WIDTHS, Hypernetwork, HypernetworkModule

__version__ = "0.1.0"

__all__ = [
    "Attachment",
    "FormatError",
    "Hypernetwork",
    "HypernetError",
    "HypernetworkModule",
    "NotAHypernetworkError",
    "SD1_WIDTHS",
    "SD2_WIDTHS",
    "SDXL_WIDTHS",
    "UsageError",
    "WidthMismatchError",
    "apply_hypernetworks",
    "attach",
    "attention_widths",
    "compile_blocks",
    "load",
    "save",
    "shorthash",
]
