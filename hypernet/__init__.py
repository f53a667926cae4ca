"""AUTOMATIC1111-style hypernetworks for diffusers: the module, the file formats, attaching to a UNet."""

from .attachment import Attachment, apply_hypernetworks, attach, attention_widths, compile_blocks
from .errors import FormatError, HypernetError, NotAHypernetworkError, UsageError, WidthMismatchError
from .formats import FileLayout, HypernetworkFile, load, read, save
from .hashing import shorthash
from .module import SD1_WIDTHS, SD2_WIDTHS, SDXL_WIDTHS, Hypernetwork, HypernetworkConfig, HypernetworkModule
from .optimizer_file import OptimizerState

__version__ = "0.1.0"

__all__ = [
    "Attachment",
    "FileLayout",
    "FormatError",
    "Hypernetwork",
    "HypernetError",
    "HypernetworkConfig",
    "HypernetworkFile",
    "HypernetworkModule",
    "NotAHypernetworkError",
    "OptimizerState",
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
    "read",
    "save",
    "shorthash",
]
