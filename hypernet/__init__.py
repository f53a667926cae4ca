"""AUTOMATIC1111-style hypernetworks for diffusers: the module, the file formats, the attention processor."""

from .errors import FormatError, HypernetError, NotAHypernetworkError, UsageError, WidthMismatchError
from .formats import load, save, shorthash
from .module import SD1_WIDTHS, SD2_WIDTHS, SDXL_WIDTHS, Hypernetwork, HypernetworkModule
from .processor import (
    Attachment,
    ContextCache,
    HypernetworkAttnProcessor,
    apply_hypernetworks,
    attach,
    attention_widths,
)

__version__ = "0.1.0"

__all__ = [
    "Attachment",
    "ContextCache",
    "FormatError",
    "Hypernetwork",
    "HypernetworkAttnProcessor",
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
    "load",
    "save",
    "shorthash",
]
