"""What the AUTOMATIC1111 webui and ComfyUI make of a hypernetwork file, by their own loaders' rules.

The webui (modules/safe.py) refuses a .pt whose zip holds a member outside a fixed list, or whose pickle names a
global outside a fixed list, and a refused .optim companion makes the whole hypernetwork fail to load. ComfyUI
(comfy_extras/nodes_hypernetwork.py) rebuilds each module from the state dict's `.weight` keys with rules of its
own, which agree with the webui's for most settings but not all.
"""

import os
import pickletools
import re
import zipfile

from .optimizer_file import OPTIM_SUFFIX

WEBUI_ZIP_MEMBERS = {
    "v1.0 to v1.9.4": re.compile(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$"),
    "v1.10 and later": re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$"),
}
WEBUI_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    *(
        ("torch", name)
        for name in (
            "FloatStorage",
            "HalfStorage",
            "IntStorage",
            "LongStorage",
            "DoubleStorage",
            "ByteStorage",
            "float32",
            "BFloat16Storage",
        )
    ),
    ("torch.nn.modules.container", "ParameterDict"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("_codecs", "encode"),
    ("__builtin__", "set"),
}
COMFYUI_ACTIVATIONS = ("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "softsign", "mish")


def pickle_globals(data):
    """The (module, name) globals a pickle imports, read from its opcodes without unpickling it."""
    found, pushed, memo = set(), [], {}
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name in ("GLOBAL", "INST"):
            found.add(tuple(arg.split(" ", 1)))
        elif opcode.name == "STACK_GLOBAL" and len(pushed) >= 2:
            found.add((pushed[-2], pushed[-1]))
        elif opcode.name in ("BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE"):
            pushed.append(arg)
        elif opcode.name in ("BINPUT", "LONG_BINPUT", "PUT") and pushed:
            memo[arg] = pushed[-1]
        elif opcode.name == "MEMOIZE" and pushed:
            memo[len(memo)] = pushed[-1]
        elif opcode.name in ("BINGET", "LONG_BINGET", "GET") and arg in memo:
            pushed.append(memo[arg])
    return found


def webui_refusals(path):
    """{webui versions: why its modules/safe.py refuses this .pt or .optim file, or None where it accepts it}."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickles = [n for n in names if re.fullmatch(r"[^/]+/data\.pkl", n)]
            data = archive.read(pickles[0]) if len(pickles) == 1 else None
    except zipfile.BadZipFile:
        return dict.fromkeys(WEBUI_ZIP_MEMBERS, "not a zip-format torch file; re-save it with convert.py")
    if data is None:
        return dict.fromkeys(WEBUI_ZIP_MEMBERS, f"{len(pickles)} data.pkl members where it needs exactly one")
    forbidden = sorted(pickle_globals(data) - WEBUI_GLOBALS)
    result = {}
    for versions, allowed in WEBUI_ZIP_MEMBERS.items():
        bad = [name for name in names if not allowed.match(name)]
        if bad:
            result[versions] = f"zip member {bad[0]} is not one it admits"
        elif forbidden:
            result[versions] = f"the pickle needs {'.'.join(forbidden[0])}, which it forbids"
        else:
            result[versions] = None
    return result


def webui_verdict(path):
    """One line: whether the webui loads this file (its .optim companion included)."""
    if not path.endswith(".pt"):
        return "not listed: the webui reads only .pt files from models/hypernetworks; convert it to .pt"
    refusals = webui_refusals(path)
    optim = path + OPTIM_SUFFIX
    if os.path.isfile(optim):
        for versions, reason in webui_refusals(optim).items():
            if reason and not refusals[versions]:
                refusals[versions] = f"its {os.path.basename(optim)} is refused ({reason}), which fails the whole load"
    refused = {versions: reason for versions, reason in refusals.items() if reason}
    if not refused:
        return "loads (every webui 1.x)"
    if len(refused) == len(refusals):
        return f"refuses it: {next(iter(refused.values()))}; re-save it with convert.py"
    parts = [
        f"{versions}: refuses it, {refused[versions]}" if versions in refused else f"{versions}: loads"
        for versions in refusals
    ]
    return "; ".join(parts) + "; re-saved with convert.py it loads in every webui 1.x"


def comfyui_layers(weight_keys, activation_func, is_layer_norm, use_dropout, activate_output, last_layer_dropout):
    """The layers ComfyUI builds for one module from its state dict's .weight keys, in order, by name."""
    layers, i = [], 0
    while i < len(weight_keys):
        last, penultimate = i == len(weight_keys) - 1, i == len(weight_keys) - 2
        layers.append("Linear")
        if activation_func != "linear" and (not last or activate_output):
            layers.append(activation_func)
        if is_layer_norm:
            i += 1
            layers.append("LayerNorm")
        if use_dropout and not last and (not penultimate or last_layer_dropout):
            layers.append("Dropout")
        i += 1
    return layers


def webui_layers(module, activation_func):
    """The layers the webui (and hypernet) run for one module at inference, by name; dropout is off there."""
    names = []
    for layer in module.linear:
        kind = type(layer).__name__
        if kind in ("Linear", "LayerNorm"):
            names.append(kind)
        elif kind != "Dropout":
            names.append(activation_func)
    return names


def comfyui_verdict(file, path):
    """One line: whether ComfyUI loads the file at `path` (read as the HypernetworkFile `file`), and whether it then
    computes what the webui and hypernet do."""
    if not path.endswith(".pt"):
        return "lists it but applies nothing: ComfyUI reads hypernetworks from .pt files only; convert it to .pt"
    hn, config = file.hypernetwork, file.hypernetwork.config
    present = set(file.layout.keys) if file.layout.keys is not None else None

    def read(key, setting, default):  # ComfyUI's sd.get(key, default)
        return getattr(config, setting) if present is None or key in present else default

    activation = read("activation_func", "activation_func", "linear")
    if activation not in COMFYUI_ACTIVATIONS:
        return f"refuses it: activation_func {activation!r} is not one it knows ({', '.join(COMFYUI_ACTIVATIONS)})" + (
            "; the webui reads None as linear" if activation is None else ""
        )
    settings = dict(
        activation_func=activation,
        is_layer_norm=read("is_layer_norm", "add_layer_norm", False),
        use_dropout=read("use_dropout", "use_dropout", False),
        activate_output=read("activate_output", "activate_output", False),
        last_layer_dropout=read("last_layer_dropout", "last_layer_dropout", False),
    )
    module = hn.pair(hn.widths[0])[0]
    weight_keys = [key for key in module.state_dict() if key.endswith(".weight")]
    theirs, ours = comfyui_layers(weight_keys, **settings), webui_layers(module, config.activation_func)
    if "Dropout" in theirs:
        return "loads but computes differently: it never switches dropout off, so its outputs are random (use_dropout)"
    if theirs == ours:
        return "loads and computes the same"
    if settings["is_layer_norm"] and not config.activate_output:
        why = "with layer norm it applies the activation after the last layer too (activate_output is False)"
    elif config.activate_output and not settings["activate_output"]:
        why = "the file has no activate_output key: the webui reads True, ComfyUI False"
    else:
        why = f"it builds {theirs} where the webui builds {ours}"
    return f"loads but computes differently: {why}"
