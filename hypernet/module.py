"""The hypernetwork itself, exactly as AUTOMATIC1111 defines it (modules/hypernetworks/hypernetwork.py)."""

import dataclasses
import functools
import inspect
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ArgumentError
from .flags import MULTIPLIER

ACTIVATIONS = {
    "linear": nn.Identity,
    "relu": nn.ReLU,
    "leakyrelu": nn.LeakyReLU,
    "elu": nn.ELU,
    "swish": nn.Hardswish,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}
ACTIVATIONS.update(
    {
        name.lower(): cls
        for name, cls in inspect.getmembers(nn.modules.activation, inspect.isclass)
        if cls.__module__ == "torch.nn.modules.activation"
    }
)


def _elementwise(cls):
    """Whether an activation class builds without arguments and maps each element on its own, as a hypernetwork
    layer needs (Softmax, GLU, Threshold, MultiheadAttention do not)."""
    try:
        with torch.device("cpu"):  # whatever device the caller builds on (a file is checked on "meta"), tried here
            activation = cls().eval()
            x = torch.linspace(-3, 3, 12).reshape(3, 4)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            whole = activation(x)
            apart = torch.stack([activation(v.reshape(1, 1)).reshape(()) for v in x.flatten()]).reshape(3, 4)
        return whole.shape == x.shape and torch.allclose(whole, apart, atol=1e-5)
    except Exception:  # an activation that needs arguments or another input shape
        return False


@functools.cache
def trainable_activations():
    """The activation_func names a new hypernetwork may use: those that map each element on their own (built and
    tried once, when first asked)."""
    return tuple(name for name, cls in ACTIVATIONS.items() if _elementwise(cls))


WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")

# The attention widths of the model families A1111 creates hypernetworks for (text context first).
SD1_WIDTHS = (768, 320, 640, 1280)
SD2_WIDTHS = (1024, 320, 640, 1280)
SDXL_WIDTHS = (2048, 640, 1280)


# The largest multiplier either way: the webui's slider ends at 1 and 2 already distorts; beyond this none is meant.


def check_layer_structure(layer_structure):
    if isinstance(layer_structure, (str, bytes)) or not isinstance(layer_structure, (list, tuple)):
        raise ArgumentError("layer_structure", f"{layer_structure!r}: give a list of numbers, e.g. [1, 2, 1]")
    numbers = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in layer_structure)
    if not numbers or any(not math.isfinite(a) or a <= 0 for a in layer_structure):
        raise ArgumentError("layer_structure", f"{list(layer_structure)} must hold positive, finite numbers")
    if len(layer_structure) < 2 or layer_structure[0] != 1 or layer_structure[-1] != 1:
        raise ArgumentError("layer_structure", f"{list(layer_structure)} must start and end with 1, e.g. 1,2,1")


def check_widths(widths):
    if isinstance(widths, (str, bytes)) or not isinstance(widths, (list, tuple)):
        raise ArgumentError("widths", f"{widths!r}: give a list of attention widths, e.g. [768, 320, 640, 1280]")
    if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ArgumentError("widths", f"{list(widths)} must hold positive whole numbers (attention widths)")


def check_activation_func(activation_func):
    """A name of ACTIVATIONS whose class builds without arguments (as the webui builds it); the names offered are the
    elementwise ones a new hypernetwork may train with."""
    cls = ACTIVATIONS.get(activation_func) if isinstance(activation_func, str) else None
    if activation_func is not None and not _builds(cls):
        raise ArgumentError(
            "activation_func",
            f"{activation_func!r}: unknown activation; use one of: {', '.join(trainable_activations())}",
        )


def _builds(cls):
    try:
        return cls is not None and (cls() is not None)
    except Exception:  # a class that needs arguments (MultiheadAttention, Threshold, ...)
        return False


def check_multiplier(multiplier):
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)):
        raise ArgumentError("multiplier", f"{multiplier!r}: give a number")
    if not MULTIPLIER.allows(multiplier):
        raise ArgumentError("multiplier", f"{multiplier}: {MULTIPLIER.describe()}")


def check_dropout_structure(dropout_structure, layer_structure):
    if len(dropout_structure) != len(layer_structure):
        raise ArgumentError(
            "dropout_structure",
            f"{list(dropout_structure)} must have one entry per layer_structure entry {list(layer_structure)}",
        )
    if any(not 0 <= p < 1 for p in dropout_structure) or dropout_structure[-1] != 0:
        raise ArgumentError(
            "dropout_structure", f"{list(dropout_structure)} needs probabilities in [0, 1) and a last entry of 0"
        )


def default_dropout_structure(layer_structure, use_dropout, last_layer_dropout):
    """A1111's parse_dropout_structure: what an older file without dropout_structure meant."""
    if not use_dropout:
        return [0] * len(layer_structure)
    return [0] + [0.3] * (len(layer_structure) - 3) + [0.3 if last_layer_dropout else 0] + [0]


def setting(default, key=None, absent=dataclasses.MISSING, architecture=False, help=""):
    """A HypernetworkConfig field: `key` is its name in the webui's .pt (the field's name where None), `absent` the
    value the webui's loader assumes where a file lacks the key (the default where not given); `architecture`: it
    shapes the modules and is chosen when one is created (the webui's "Create hypernetwork" tab)."""
    kwargs = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    absent = default if absent is dataclasses.MISSING else absent
    return field(**kwargs, metadata={"key": key, "absent": absent, "architecture": architecture, "help": help})


@dataclass
class HypernetworkConfig:
    """Every setting of a hypernetwork under the webui's names, in the order its .pt holds them: what the modules
    are built from, what every file format writes, what `convert.py --info` shows and what the training script's
    flags set. `widths` are the attention widths that get a K and a V module (the webui's enable_sizes).

    The defaults are the webui's "Create hypernetwork" tab's; `file_key` and `absent_value` give a setting's key in
    a .pt and the value the webui's loader assumes where a file lacks it.
    """

    widths: Sequence[int]
    step: int = setting(0, help="Optimizer steps the weights were trained for.")
    name: str | None = setting(None, help="The hypernetwork's name (the webui shows the file's name).")
    layer_structure: list[float] = setting(
        [1, 2, 1],
        architecture=True,
        help="Layer widths as multiples of the attention width, starting and ending with 1: 1,2,1 or 1,1.5,1.5,1.",
    )
    activation_func: str | None = setting(
        "linear",
        absent=None,
        architecture=True,
        help="Activation after each hidden layer: linear (none), relu, leakyrelu, elu, swish, tanh, sigmoid, or any "
        "elementwise torch.nn activation by its lower-case name (ComfyUI knows linear to sigmoid, softsign and mish).",
    )
    add_layer_norm: bool = setting(
        False, key="is_layer_norm", architecture=True, help="Add a LayerNorm after each layer."
    )
    weight_init: str = setting(
        "Normal",
        key="weight_initialization",
        architecture=True,
        help=f"How new weights are initialised: {', '.join(WEIGHT_INITS)}.",
    )
    sd_checkpoint: str | None = setting(None, help="Short hash of the model it was trained on.")
    sd_checkpoint_name: str | None = setting(None, help="Name of the model it was trained on.")
    activate_output: bool = setting(
        False, absent=True, architecture=True, help="Also apply the activation after the last layer."
    )
    use_dropout: bool = setting(
        False, architecture=True, help="Use dropout (the webui's structure: 0.3 after each hidden layer but the last)."
    )
    dropout_structure: list[float] | None = setting(
        None,
        architecture=True,
        help="Dropout probability after each layer, one per layer_structure entry, the last 0, e.g. 0,0.1,0 "
        "(implies use_dropout).",
    )
    last_layer_dropout: bool | None = setting(
        None, absent=False, help="Dropout after the last hidden layer too (the webui's older files)."
    )
    optional_info: str | None = setting(None, help="Free text the webui shows with the hypernetwork.")

    def __post_init__(self):
        check_widths(self.widths)
        self.widths = [int(width) for width in self.widths]
        self.layer_structure = list(self.layer_structure)
        check_layer_structure(self.layer_structure)
        check_activation_func(self.activation_func)
        if self.dropout_structure is None:
            self.dropout_structure = default_dropout_structure(
                self.layer_structure, self.use_dropout, bool(self.last_layer_dropout)
            )
        self.dropout_structure = list(self.dropout_structure)
        check_dropout_structure(self.dropout_structure, self.layer_structure)
        self.use_dropout = bool(self.use_dropout or any(self.dropout_structure))
        if self.last_layer_dropout is None:
            self.last_layer_dropout = self.dropout_structure[-2] != 0

    @staticmethod
    def settings() -> list[dataclasses.Field]:
        """The fields the webui's .pt holds, in its order (every field but widths)."""
        return [f for f in dataclasses.fields(HypernetworkConfig) if f.name != "widths"]

    @staticmethod
    def architecture() -> list[dataclasses.Field]:
        """The settings that shape the modules, chosen when a hypernetwork is created."""
        return [f for f in dataclasses.fields(HypernetworkConfig) if f.metadata.get("architecture")]

    @staticmethod
    def help(name: str) -> str:
        """A setting's help text (the training script's flag help)."""
        return HypernetworkConfig.__dataclass_fields__[name].metadata["help"]

    @staticmethod
    def file_key(name: str) -> str:
        """A setting's key in the webui's .pt: is_layer_norm for add_layer_norm, weight_initialization for
        weight_init, the setting's own name for the others."""
        return HypernetworkConfig.__dataclass_fields__[name].metadata["key"] or name

    @staticmethod
    def absent_value(name: str):
        """The value the webui's loader assumes for a setting its file lacks."""
        value = HypernetworkConfig.__dataclass_fields__[name].metadata["absent"]
        return list(value) if isinstance(value, list) else value

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class HypernetworkModule(nn.Module):
    """The residual MLP A1111 puts in front of an attention layer's K or V projection, for inputs of `width`
    channels (the webui's `dim`)."""

    def __init__(
        self,
        width: int,
        layer_structure: Sequence[float] = (1, 2, 1),
        activation_func: str | None = "linear",
        weight_init: str | None = "Normal",
        add_layer_norm: bool = False,
        activate_output: bool = False,
        dropout_structure: Sequence[float] | None = None,
    ):
        super().__init__()
        check_layer_structure(layer_structure)
        check_activation_func(activation_func)
        if dropout_structure is not None:
            check_dropout_structure(dropout_structure, layer_structure)
        # The multiplier as a tensor too, for forward: a compiled block reads its value, so that changing it compiles
        # nothing again. Not persistent: no file holds it, as the webui's files hold none.
        self.register_buffer("multiplier_tensor", torch.ones(()), persistent=False)
        self.multiplier = 1.0

        layers = []
        last = len(layer_structure) - 2
        for i in range(len(layer_structure) - 1):
            width_out = int(width * layer_structure[i + 1])
            layers.append(nn.Linear(int(width * layer_structure[i]), width_out))
            if activation_func not in (None, "linear") and (i < last or activate_output):
                layers.append(ACTIVATIONS[activation_func]())
            if add_layer_norm:
                layers.append(nn.LayerNorm(width_out))
            if dropout_structure is not None and dropout_structure[i + 1] > 0:
                layers.append(nn.Dropout(p=dropout_structure[i + 1]))
        self.linear = nn.Sequential(*layers)
        if weight_init is not None:
            self.reset_parameters(weight_init, activation_func)

    @torch.no_grad()
    def reset_parameters(self, weight_init: str = "Normal", activation_func: str | None = None) -> None:
        if weight_init not in WEIGHT_INITS:
            raise ArgumentError("weight_init", f"{weight_init!r}: unknown; use one of: {', '.join(WEIGHT_INITS)}")
        nonlinearity = "leaky_relu" if activation_func == "leakyrelu" else "relu"
        for layer in self.linear:
            if type(layer) not in (nn.Linear, nn.LayerNorm):
                continue
            if weight_init == "Normal" or type(layer) is nn.LayerNorm:
                nn.init.normal_(layer.weight, mean=0.0, std=0.01)
            elif weight_init == "XavierUniform":
                nn.init.xavier_uniform_(layer.weight)
            elif weight_init == "XavierNormal":
                nn.init.xavier_normal_(layer.weight)
            elif weight_init == "KaimingUniform":
                nn.init.kaiming_uniform_(layer.weight, nonlinearity=nonlinearity)
            else:
                nn.init.kaiming_normal_(layer.weight, nonlinearity=nonlinearity)
            nn.init.zeros_(layer.bias)

    @property
    def multiplier(self) -> float:
        return self._multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        self._multiplier = float(value)
        with torch.no_grad():
            self.multiplier_tensor.fill_(self._multiplier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x) * (1.0 if self.training else self.multiplier_tensor)

    @property
    def is_linear(self) -> bool:
        """Whether the MLP is only Linear layers as it runs now: no activation, no layer norm, no active dropout."""
        return all(
            isinstance(layer, (nn.Linear, nn.Identity)) or (isinstance(layer, nn.Dropout) and not self.training)
            for layer in self.linear
        )

    @property
    def linears(self) -> list[nn.Linear]:
        return [layer for layer in self.linear if isinstance(layer, nn.Linear)]

    def linear_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) with self(x) == x + F.linear(x, weight, bias), for a module whose MLP is_linear."""
        linears = self.linears
        weight, bias = linears[0].weight, linears[0].bias
        for layer in linears[1:]:
            weight, bias = layer.weight @ weight, F.linear(bias, layer.weight, layer.bias)
        multiplier = 1.0 if self.training else self.multiplier_tensor
        return weight * multiplier, bias * multiplier


class Hypernetwork(nn.Module):
    """A K and a V HypernetworkModule for each width in its config, as the webui's Hypernetwork holds them.

    Hypernetwork(HypernetworkConfig(...)), or as shorthand Hypernetwork(widths, **settings). An nn.Module so that
    accelerate can prepare it and state_dict() is the one source of its weights for every format. `initialize=False`
    skips the weight initialisation (for weights about to be loaded).
    """

    def __init__(self, config: "HypernetworkConfig | Sequence[int]", /, initialize: bool = True, **settings):
        super().__init__()
        if not isinstance(config, HypernetworkConfig):
            config = HypernetworkConfig(config, **settings)
        elif settings:
            raise TypeError("give either a HypernetworkConfig or widths with settings, not both")
        self.config = config
        self.layers = nn.ModuleDict()
        for width in config.widths:
            modules = [
                HypernetworkModule(
                    width,
                    config.layer_structure,
                    config.activation_func,
                    config.weight_init if initialize else None,
                    config.add_layer_norm,
                    config.activate_output,
                    config.dropout_structure,
                )
                for _ in "kv"
            ]
            self.layers[str(width)] = nn.ModuleList(modules)

    @property
    def widths(self) -> list[int]:
        return [int(width) for width in self.layers]

    def pair(self, width: int) -> "tuple[HypernetworkModule, HypernetworkModule] | None":
        """The (K, V) modules for an attention width, or None where this hypernetwork has none."""
        modules = self.layers[str(width)] if str(width) in self.layers else None
        return None if modules is None else (modules[0], modules[1])

    def set_multiplier(self, multiplier: float) -> "Hypernetwork":
        """What its output is scaled by in eval mode (the webui's multiplier); training always applies it at 1."""
        check_multiplier(multiplier)
        for module in self.modules():
            if isinstance(module, HypernetworkModule):
                module.multiplier = float(multiplier)
        return self

    @property
    def multiplier(self) -> float:
        """The multiplier of its modules (set_multiplier sets them all)."""
        for module in self.modules():
            if isinstance(module, HypernetworkModule):
                return module.multiplier
        return 1.0

    def extra_repr(self):
        c = self.config
        return (
            f"name={c.name!r}, step={c.step}, widths={self.widths}, layer_structure={c.layer_structure}, "
            f"activation_func={c.activation_func!r}, multiplier={self.multiplier}"
        )
