"""AUTOMATIC1111-style hypernetworks for diffusers: the module, the file formats, attaching to a UNet.

    config = hypernet.HypernetworkConfig(hypernet.SD1_WIDTHS, layer_structure=[1, 2, 1], activation_func="relu")
    hn = hypernet.Hypernetwork(config)                    # or hypernet.load("style.pt")
    hypernet.save(hn, "style.pt")                         # the webui's .pt; .safetensors by suffix
    with hypernet.attach(pipe.unet, [hn.eval().set_multiplier(0.8)], merge=True):
        image = pipe("a castle").images[0]

HypernetworkConfig: every setting, under the webui's names. Hypernetwork / HypernetworkModule: the modules.
read() -> HypernetworkFile (hypernetwork, FileLayout, OptimizerState), load() -> Hypernetwork, save().
attach() -> Attachment (merge(), unmerge(), merged(), detach()); compile_blocks(): regional torch.compile.
Errors: HypernetError and its subclasses, each one line naming the file or value and what to do; an ArgumentError
names the function argument that held the bad value (its `argument`), and the scripts report it as their flag's.
"""

from .attachment import Attachment, apply_hypernetworks, attach, attention_widths, compile_blocks
from .errors import (
    ArgumentError,
    FormatError,
    HypernetError,
    NotAHypernetworkError,
    UsageError,
    WidthMismatchError,
)
from .formats import FileLayout, HypernetworkFile, load, read, save
from .hashing import shorthash
from .module import SD1_WIDTHS, SD2_WIDTHS, SDXL_WIDTHS, Hypernetwork, HypernetworkConfig, HypernetworkModule
from .optimizer_file import OptimizerState

__version__ = "0.1.0"

__all__ = [
    "ArgumentError",
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
