"""The hypernetwork itself, exactly as AUTOMATIC1111 defines it (modules/hypernetworks/hypernetwork.py)."""

import inspect
import itertools
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .errors import HypernetError

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
        activation = cls().eval()
        x = torch.linspace(-3, 3, 12).reshape(3, 4)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            whole = activation(x)
            apart = torch.stack([activation(v.reshape(1, 1)).reshape(()) for v in x.flatten()]).reshape(3, 4)
        return whole.shape == x.shape and torch.allclose(whole, apart, atol=1e-5)
    except Exception:  # an activation that needs arguments or another input shape
        return False


TRAINABLE_ACTIVATIONS = tuple(name for name, cls in ACTIVATIONS.items() if _elementwise(cls))
WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")

# The attention widths of the model families A1111 creates hypernetworks for (text context first).
SD1_WIDTHS = (768, 320, 640, 1280)
SD2_WIDTHS = (1024, 320, 640, 1280)
SDXL_WIDTHS = (2048, 640, 1280)


def check_layer_structure(layer_structure):
    if len(layer_structure) < 2 or layer_structure[0] != 1 or layer_structure[-1] != 1:
        raise HypernetError(f"layer_structure {list(layer_structure)} must start and end with 1, e.g. 1,2,1")
    if any(not isinstance(a, (int, float)) or a <= 0 for a in layer_structure):
        raise HypernetError(f"layer_structure {list(layer_structure)} must hold positive numbers")


def check_dropout_structure(dropout_structure, layer_structure):
    if len(dropout_structure) != len(layer_structure):
        raise HypernetError(
            f"dropout_structure {list(dropout_structure)} must have one entry per layer_structure "
            f"entry {list(layer_structure)}"
        )
    if any(not 0 <= p < 1 for p in dropout_structure) or dropout_structure[-1] != 0:
        raise HypernetError(
            f"dropout_structure {list(dropout_structure)} needs probabilities in [0, 1) and a last entry of 0"
        )


def default_dropout_structure(layer_structure, use_dropout, last_layer_dropout):
    """A1111's parse_dropout_structure: what an older file without dropout_structure meant."""
    if not use_dropout:
        return [0] * len(layer_structure)
    return [0] + [0.3] * (len(layer_structure) - 3) + [0.3 if last_layer_dropout else 0] + [0]


class HypernetworkModule(nn.Module):
    """The residual MLP A1111 puts in front of an attention layer's K or V projection."""

    def __init__(
        self,
        dim,
        layer_structure=(1, 2, 1),
        activation_func="linear",
        weight_init="Normal",
        add_layer_norm=False,
        activate_output=False,
        dropout_structure=None,
    ):
        super().__init__()
        check_layer_structure(layer_structure)
        if activation_func is not None and activation_func not in ACTIVATIONS:
            raise HypernetError(
                f"unknown activation_func {activation_func!r}; use one of: {', '.join(sorted(ACTIVATIONS))}"
            )
        if dropout_structure is not None:
            check_dropout_structure(dropout_structure, layer_structure)
        # The multiplier as a tensor too, for forward: a compiled block reads its value, so that changing it compiles
        # nothing again. Not persistent: no file holds it, as the webui's files hold none.
        self.register_buffer("multiplier_tensor", torch.ones(()), persistent=False)
        self.multiplier = 1.0

        layers = []
        last = len(layer_structure) - 2
        for i in range(len(layer_structure) - 1):
            width_out = int(dim * layer_structure[i + 1])
            layers.append(nn.Linear(int(dim * layer_structure[i]), width_out))
            if activation_func not in (None, "linear") and (i < last or activate_output):
                layers.append(ACTIVATIONS[activation_func]())
            if add_layer_norm:
                layers.append(nn.LayerNorm(width_out))
            if dropout_structure is not None and dropout_structure[i + 1] > 0:
                layers.append(nn.Dropout(p=dropout_structure[i + 1]))
        self.linear = nn.Sequential(*layers)
        self.reset_parameters(weight_init, activation_func)

    @torch.no_grad()
    def reset_parameters(self, weight_init="Normal", activation_func=None):
        if weight_init not in WEIGHT_INITS:
            raise HypernetError(f"unknown weight_init {weight_init!r}; use one of: {', '.join(WEIGHT_INITS)}")
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
    def multiplier(self):
        return self._multiplier

    @multiplier.setter
    def multiplier(self, value):
        self._multiplier = float(value)
        with torch.no_grad():
            self.multiplier_tensor.fill_(self._multiplier)

    def forward(self, x):
        return x + self.linear(x) * (1.0 if self.training else self.multiplier_tensor)

    @property
    def is_linear(self):
        """Whether the MLP is only Linear layers as it runs now: no activation, no layer norm, no active dropout."""
        return all(
            isinstance(layer, (nn.Linear, nn.Identity)) or (isinstance(layer, nn.Dropout) and not self.training)
            for layer in self.linear
        )

    @property
    def linears(self):
        return [layer for layer in self.linear if isinstance(layer, nn.Linear)]

    def linear_map(self):
        """(weight, bias) with self(x) == x + F.linear(x, weight, bias), for a module whose MLP is_linear."""
        linears = self.linears
        weight, bias = linears[0].weight, linears[0].bias
        for layer in linears[1:]:
            weight, bias = layer.weight @ weight, F.linear(bias, layer.weight, layer.bias)
        multiplier = 1.0 if self.training else self.multiplier_tensor
        return weight * multiplier, bias * multiplier


# Revisions are unique across hypernetworks, so that a stack's tuple of revisions names its exact state.
_revisions = itertools.count()
_live = weakref.WeakSet()


def _after_optimizer_step(optimizer, args, kwargs):
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for hypernetwork in list(_live):
        if any(id(p) in stepped for p in hypernetwork.parameters()):
            hypernetwork.changed()


register_optimizer_step_post_hook(_after_optimizer_step)


# Metadata attributes under A1111's names, with the value A1111's loader assumes when a file lacks the key.
LOAD_DEFAULTS = {
    "name": None,
    "step": 0,
    "layer_structure": [1, 2, 1],
    "activation_func": None,
    "weight_init": "Normal",
    "add_layer_norm": False,
    "use_dropout": False,
    "dropout_structure": None,
    "activate_output": True,
    "last_layer_dropout": False,
    "sd_checkpoint": None,
    "sd_checkpoint_name": None,
    "optional_info": None,
}


class Hypernetwork(nn.Module):
    """A K and a V HypernetworkModule for each enabled attention width, plus A1111's metadata.

    An nn.Module so that accelerate can prepare it and state_dict() is the one source for every format. `revision`
    changes whenever what it computes may have: set_multiplier, train()/eval(), load_state_dict, a move to another
    dtype or device, and a step of any torch optimizer over its parameters. Writes it cannot see (through .data, say) need a
    call to changed().
    """

    def __init__(
        self,
        enable_sizes,
        name=None,
        layer_structure=(1, 2, 1),
        activation_func="linear",
        weight_init="Normal",
        add_layer_norm=False,
        use_dropout=False,
        dropout_structure=None,
        activate_output=False,
        last_layer_dropout=None,
        step=0,
        sd_checkpoint=None,
        sd_checkpoint_name=None,
        optional_info=None,
    ):
        super().__init__()
        layer_structure = list(layer_structure)
        check_layer_structure(layer_structure)
        if dropout_structure is None:
            dropout_structure = default_dropout_structure(layer_structure, use_dropout, bool(last_layer_dropout))
        dropout_structure = list(dropout_structure)
        check_dropout_structure(dropout_structure, layer_structure)
        use_dropout = use_dropout or any(dropout_structure)
        if last_layer_dropout is None:
            last_layer_dropout = dropout_structure[-2] != 0

        self.name = name
        self.step = step
        self.layer_structure = layer_structure
        self.activation_func = activation_func
        self.weight_init = weight_init
        self.add_layer_norm = add_layer_norm
        self.use_dropout = use_dropout
        self.dropout_structure = dropout_structure
        self.activate_output = activate_output
        self.last_layer_dropout = last_layer_dropout
        self.sd_checkpoint = sd_checkpoint
        self.sd_checkpoint_name = sd_checkpoint_name
        self.optional_info = optional_info
        self.optimizer_name = None
        self.optimizer_state_dict = None
        # How the .pt file this came from was laid out, so that saving writes it back key for key.
        self.pt_keys = None
        self.pt_legacy_layout = False
        self.extra_pt_metadata = {}

        def make():
            return HypernetworkModule(
                dim,
                layer_structure,
                activation_func,
                weight_init,
                add_layer_norm,
                activate_output,
                dropout_structure,
            )

        self.layers = nn.ModuleDict()
        for dim in enable_sizes:
            self.layers[str(int(dim))] = nn.ModuleList([make(), make()])
        self.changed()
        _live.add(self)

    def changed(self):
        """Give this hypernetwork a new revision: anything merged or kept from the old one is made again."""
        self.revision = next(_revisions)

    def train(self, mode=True):
        super().train(mode)
        self.changed()
        return self

    def load_state_dict(self, *args, **kwargs):
        result = super().load_state_dict(*args, **kwargs)
        self.changed()
        return result

    def __setstate__(self, state):  # a copy is a hypernetwork of its own
        super().__setstate__(state)
        self.changed()
        _live.add(self)

    def _apply(self, *args, **kwargs):
        before = [(p.dtype, p.device) for p in self.parameters()]
        result = super()._apply(*args, **kwargs)
        if [(p.dtype, p.device) for p in self.parameters()] != before:
            self.changed()
        return result

    @property
    def widths(self):
        return [int(dim) for dim in self.layers]

    def pair(self, width):
        """The (K, V) modules for an attention width, or None where this hypernetwork has none."""
        modules = self.layers[str(width)] if str(width) in self.layers else None
        return None if modules is None else (modules[0], modules[1])

    def set_multiplier(self, multiplier):
        for module in self.modules():
            if isinstance(module, HypernetworkModule):
                module.multiplier = float(multiplier)
        self.changed()
        return self

    @property
    def multiplier(self):
        for module in self.modules():
            if isinstance(module, HypernetworkModule):
                return module.multiplier
        return 1.0

    def metadata(self):
        return {key: getattr(self, key) for key in LOAD_DEFAULTS}

    def extra_repr(self):
        return (
            f"name={self.name!r}, step={self.step}, widths={self.widths}, layer_structure={self.layer_structure}, "
            f"activation_func={self.activation_func!r}, multiplier={self.multiplier}"
        )
