"""Hypernetwork files: the webui's .pt (its zip layout, both module layouts), safetensors, and the .optim companion.

The .pt layout is AUTOMATIC1111's own (docs/format.md): {width: (k_state_dict, v_state_dict), ..., settings}.
Every file is untrusted: a .pt is read with torch.load(weights_only=True) after its zip is checked, and modules are
built only once the file's tensors fit its settings (hypernet.untrusted).
"""

import io
import json
import os
import re
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file as save_safetensors_file

from .errors import ArgumentError, FormatError, HypernetError, NotAHypernetworkError, first_line
from .files import atomic_writes
from .hashing import shorthash
from .modelspec import modelspec_metadata
from .module import ACTIVATIONS, Hypernetwork, HypernetworkConfig
from .optimizer_file import OPTIM_SUFFIX, OptimizerState, read_optimizer_state
from .untrusted import (
    MAX_LAYER_MULTIPLE,
    MAX_LAYERS,
    MAX_VALUES,
    SAFETENSORS_DTYPES,
    DuplicateKey,
    check_number,
    check_plain,
    check_tensor,
    check_width,
    read_safetensors_header,
    torch_load_safely,
    unique_keys,
)

# The webui's .pt keys, in the order its Hypernetwork.save() writes them, and the setting each one holds.
PT_KEYS = {HypernetworkConfig.file_key(f.name): f.name for f in HypernetworkConfig.settings()}

# The pre-2022-10 layout named the two Linears of a [1, 2, 1] module linear1 and linear2, and held each width's
# pair of OrderedDicts in a list where the current one holds a tuple.
LEGACY_NAMES = {"linear1.": "linear.0.", "linear2.": "linear.1."}

SAFETENSORS_FORMAT = "hypernet.a1111"

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# The zip members every webui 1.x admits (modules/safe.py, v1.0 to v1.9.4; v1.10 also admits byteorder and
# .data/serialization_id). Recent torch.save also writes .format_version and .storage_alignment, which every
# webui refuses, so a .pt is written with these members alone.
WEBUI_RECORD = re.compile(r"data\.pkl|data/\d+|version")

STORAGE_ALIGNMENT = 64


@dataclass
class FileLayout:
    """How a webui .pt laid out what it holds, so that converting it writes it back key for key: its settings' keys
    in its order (None: the current webui's), the pre-2022-10 module layout, and keys of its own beyond the
    settings (kept as they were)."""

    keys: list[str] | None = None
    legacy: bool = False
    extra: dict = field(default_factory=dict)


@dataclass
class HypernetworkFile:
    """What a hypernetwork file holds: the hypernetwork, the layout it came in, and its .optim companion's optimizer
    state where that was asked for and belongs to the file."""

    hypernetwork: Hypernetwork
    layout: FileLayout = field(default_factory=FileLayout)
    optimizer: OptimizerState | None = None


def torch_save_for_webui(obj, tmp, path):
    """torch.save(obj) into `tmp`, as a zip whose members are ROOT/data.pkl, ROOT/data/N and ROOT/version, with
    ROOT the stem of `path`, the file's final name (what torch.save names it). Storages stay 64-byte aligned, so
    torch.load(mmap=True) reads them in place."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    root = os.path.splitext(os.path.basename(path))[0]
    with zipfile.ZipFile(buffer) as source, open(tmp, "wb") as f, zipfile.ZipFile(f, "w") as target:
        for member in source.infolist():
            record = member.filename.partition("/")[2]
            if not WEBUI_RECORD.fullmatch(record):
                continue
            info = zipfile.ZipInfo(f"{root}/{record}", date_time=(1980, 1, 1, 0, 0, 0))
            header = 30 + len(info.filename.encode()) + 4  # local header, name, the padding field's own 4 bytes
            padding = -(f.tell() + header) % STORAGE_ALIGNMENT
            info.extra = struct.pack("<HH", 0x4246, padding) + b"Z" * padding  # torch's own padding field ("FB")
            target.writestr(info, source.read(member))


def check_settings(meta):
    """The webui's settings, each of its type and in its range; raises FormatError (without the path) otherwise."""
    for key in ("name", "weight_init", "sd_checkpoint", "sd_checkpoint_name", "optional_info"):
        if meta[key] is not None and not isinstance(meta[key], str):
            raise FormatError(f"{key} is a {type(meta[key]).__name__}, not text")
    for key in ("add_layer_norm", "use_dropout", "activate_output", "last_layer_dropout"):
        if not isinstance(meta[key], bool):
            raise FormatError(f"{key} is {meta[key]!r}, not true or false")
    meta["step"] = check_number(meta["step"], "step", whole=True)
    if not 0 <= meta["step"] <= 10**12:
        raise FormatError(f"step is {meta['step']}, outside 0 to 10^12")
    layers = meta["layer_structure"]
    if not isinstance(layers, (list, tuple)) or not 2 <= len(layers) <= MAX_LAYERS:
        raise FormatError(f"layer_structure is {str(layers)[:80]}, not a list of 2 to {MAX_LAYERS} numbers")
    if layers[0] != 1 or layers[-1] != 1:
        raise FormatError(f"layer_structure {list(layers)[:8]} must start and end with 1, e.g. 1,2,1")
    for a in layers:
        if not 0 < check_number(a, "layer_structure entry") <= MAX_LAYER_MULTIPLE:
            raise FormatError(
                f"layer_structure {list(layers)}: entries must be above 0 and at most {MAX_LAYER_MULTIPLE}"
            )
    if meta["activation_func"] is not None and meta["activation_func"] not in ACTIVATIONS:
        raise FormatError(
            f"activation_func {str(meta['activation_func'])[:40]!r}: unknown; use one of: "
            f"{', '.join(sorted(ACTIVATIONS))}"
        )
    dropout = meta["dropout_structure"]
    if dropout is not None:
        if not isinstance(dropout, (list, tuple)) or len(dropout) != len(layers):
            raise FormatError(f"dropout_structure {str(dropout)[:80]} must have one entry per layer_structure entry")
        for p in dropout:
            check_number(p, "dropout_structure entry")


def meta_hypernetwork(path, widths, meta):
    """The Hypernetwork these settings describe, built on the meta device: nothing is allocated, however large the
    layers they call for."""
    try:
        check_settings(meta)
        for width in widths:
            check_width(width)
        with torch.device("meta"):
            return Hypernetwork(HypernetworkConfig(widths, **meta), initialize=False)
    except HypernetError as e:
        raise FormatError(f"{path}: {e}") from None
    except (TypeError, ValueError, OverflowError, RuntimeError) as e:
        raise FormatError(f"{path}: malformed hypernetwork settings ({first_line(e)})") from None


def check_fit(path, hn, shapes):
    """The tensors' names and shapes ({name: shape}) are exactly what the settings call for."""
    expected = {key: tuple(value.shape) for key, value in hn.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise FormatError(
            f"{path}: its weights do not fit its settings (layer_structure {hn.config.layer_structure}, activation "
            f"{hn.config.activation_func!r}, layer norm {hn.config.add_layer_norm}): "
            + (f"missing {missing[:3]} " if missing else "")
            + (f"unexpected {unexpected[:3]}" if unexpected else "")
        )
    for key, shape in shapes.items():
        if tuple(shape) != expected[key]:
            raise FormatError(
                f"{path}: {key} has shape {tuple(shape)} but layer_structure {hn.config.layer_structure} needs {expected[key]}"
            )


def build(path, widths, meta, tensors):
    """The Hypernetwork with these settings holding these tensors, which become its weights once their types,
    shapes and values are checked."""
    hn = meta_hypernetwork(path, widths, meta)
    for key, tensor in tensors.items():
        try:
            check_tensor(tensor, key)
        except FormatError as e:
            raise FormatError(f"{path}: {e}") from None
    check_fit(path, hn, {key: tensor.shape for key, tensor in tensors.items()})
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise FormatError(f"{path}: {key} holds NaN or infinite weights; the file is damaged")
    dtypes = {t.dtype for t in tensors.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    hn.load_state_dict({key: t.to(dtype).contiguous() for key, t in tensors.items()}, assign=True)
    for module in hn.modules():  # what no file holds, made on the meta device with the rest, made real
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_meta:
                setattr(module, name, torch.ones((), dtype=dtype))
    hn.set_multiplier(1.0)
    return hn


def _modern_state_dict(module_state, legacy):
    if not isinstance(module_state, dict) or not all(isinstance(k, str) for k in module_state):
        raise FormatError("a width's entry is not a state dict of tensors")
    if not legacy:
        return dict(module_state)
    renamed = {}
    for key, value in module_state.items():
        for old, new in LEGACY_NAMES.items():
            if key.startswith(old):
                key = new + key[len(old) :]
        renamed[key] = value
    return renamed


def hypernetwork_from_pt_dict(data, path, name=None):
    """The Hypernetwork and FileLayout of the dict in a webui .pt file, with the webui's values for absent keys."""
    if not isinstance(data, dict):
        raise NotAHypernetworkError(f"{path}: not a hypernetwork (the file holds a {type(data).__name__}, not a dict)")
    widths = [key for key in data if isinstance(key, int) and not isinstance(key, bool)]
    if not widths:
        raise NotAHypernetworkError(f"{path}: not a hypernetwork (no integer width keys such as 768 or 320)")
    keys = [key for key in data if key not in widths]
    budget = [MAX_VALUES]
    for key, value in data.items():
        if key in widths:
            check_plain(value, f"{path}: width {key}", budget, tensors=True)
        elif isinstance(key, str):
            check_plain(value, f"{path}: {key}", budget)
        else:
            raise FormatError(f"{path}: key {str(key)[:40]!r} is neither a width nor a setting's name")
    meta = {setting: data.get(key, HypernetworkConfig.absent_value(setting)) for key, setting in PT_KEYS.items()}
    if isinstance(meta["dropout_structure"], (list, tuple)) and any(p != 0 for p in meta["dropout_structure"]):
        meta["use_dropout"] = True
    legacy = any(
        isinstance(data[w], (tuple, list))
        and data[w]
        and isinstance(data[w][0], dict)
        and "linear1.weight" in data[w][0]
        for w in widths
    )
    meta["name"] = meta["name"] if meta["name"] is not None else name
    tensors = {}
    for width in widths:
        pair = data[width]
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise FormatError(f"{path}: width {width} should hold a (K, V) pair of state dicts")
        for index, module_state in enumerate(pair):
            try:
                module_state = _modern_state_dict(module_state, legacy)
            except FormatError as e:
                raise FormatError(f"{path}: width {width}: {e}") from None
            for key, value in module_state.items():
                tensors[f"layers.{width}.{index}.{key}"] = value
    hn = build(path, widths, meta, tensors)
    return hn, FileLayout(keys, legacy, {key: data[key] for key in keys if key not in PT_KEYS})


def pt_dict(hn, layout=None, dtype=None):
    """The dict the webui's Hypernetwork.save() writes, key for key and type for type, in `layout`."""
    layout = layout or FileLayout()
    data = {}
    for width in hn.widths:
        k, v = hn.pair(width)
        pair = [_pt_state_dict(k, layout.legacy, dtype), _pt_state_dict(v, layout.legacy, dtype)]
        data[width] = pair if layout.legacy else tuple(pair)
    for key in layout.keys if layout.keys is not None else list(PT_KEYS):
        if key in PT_KEYS:
            value = getattr(hn.config, PT_KEYS[key])
            data[key] = (value or None) if key == "optional_info" else value
        else:
            data[key] = layout.extra.get(key)
    return data


def _pt_state_dict(module, legacy, dtype):
    state = OrderedDict()
    for key, tensor in module.state_dict().items():
        tensor = tensor.detach().to("cpu", dtype=dtype or tensor.dtype).clone()
        if legacy:
            for old, new in LEGACY_NAMES.items():
                if key.startswith(new):
                    key = old + key[len(new) :]
        state[key] = tensor
    return state


def save(
    hn: Hypernetwork,
    path: str | os.PathLike,
    optimizer: OptimizerState | None = None,
    *,
    layout: FileLayout | None = None,
    dtype: torch.dtype | None = None,
    metadata: dict | None = None,
) -> None:
    """Write `hn` to `path` (.pt in the webui's layout, or .safetensors) and, given an OptimizerState, its .optim
    companion beside it. `layout`: the FileLayout of the file it was read from, to write it back key for key (the
    current webui's layout where None). `dtype`: the weights' dtype in the file. `metadata`: more text keys for a
    .safetensors file's metadata, beside the format's own and ModelSpec's (hypernet.modelspec), which they may
    replace; a .pt holds only the webui's keys.

    Both files are written under temporary names and renamed into place together: a failure (a full disk) leaves
    the previous pair whole.
    """
    path = check_path(path)
    if not isinstance(hn, Hypernetwork):
        raise ArgumentError("hn", f"a {type(hn).__name__}, not a Hypernetwork")
    if dtype is not None and dtype not in DTYPES.values():
        raise ArgumentError("dtype", f"{dtype}: a file holds {', '.join(map(str, DTYPES.values()))} weights")
    if not path.endswith((".pt", ".safetensors")):
        raise HypernetError(f"{path}: unknown format; name the file .pt (A1111) or .safetensors")
    paths = [path] if optimizer is None else [path, path + OPTIM_SUFFIX]
    with atomic_writes(paths) as temporaries:
        if path.endswith(".safetensors"):
            tensors, own = safetensors_tensors_and_metadata(hn, layout, dtype)
            clashing = sorted(set(own) & set(metadata or {}))
            if clashing:
                raise HypernetError(f"{path}: metadata keys {clashing} are the format's own")
            stem = os.path.splitext(os.path.basename(path))[0]
            described = {**modelspec_metadata(hn, stem), **{k: str(v) for k, v in (metadata or {}).items()}}
            save_safetensors_file(tensors, temporaries[0], metadata={**own, **described})
        else:
            torch_save_for_webui(pt_dict(hn, layout, dtype), temporaries[0], path)
        if optimizer is not None:
            optim = {
                "optimizer_name": optimizer.name or "AdamW",
                "hash": shorthash(temporaries[0]),  # the bytes the file will have
                "optimizer_state_dict": optimizer.state_dict,
            }
            torch_save_for_webui(optim, temporaries[1], paths[1])


def safetensors_tensors_and_metadata(hn, layout=None, dtype=None):
    layout = layout or FileLayout()
    tensors = {}
    for width in hn.widths:
        for side, module in zip("kv", hn.pair(width)):
            for key, tensor in module.state_dict().items():
                tensors[f"{width}.{side}.{key}"] = tensor.detach().to("cpu", dtype=dtype or tensor.dtype).contiguous()
    metadata = {"format": SAFETENSORS_FORMAT, "format_version": "1", "widths": json.dumps(hn.widths)}
    metadata.update({key: json.dumps(getattr(hn.config, setting)) for key, setting in PT_KEYS.items()})
    metadata["pt_keys"] = json.dumps(layout.keys if layout.keys is not None else list(PT_KEYS))
    metadata["pt_legacy_layout"] = json.dumps(layout.legacy)
    if layout.extra:
        metadata["pt_extra"] = json.dumps(layout.extra, default=str)
    return tensors, metadata


def _metadata_value(metadata, key, path, default):
    if key not in metadata:
        return default
    text = metadata[key]
    try:
        value = json.loads(text, object_pairs_hook=unique_keys) if isinstance(text, str) else None
    except DuplicateKey as e:
        raise FormatError(f"{path}: corrupted metadata: {key} has the key {e.key[:80]!r} twice") from None
    except (ValueError, RecursionError):
        raise FormatError(f"{path}: corrupted metadata: {key} is not JSON") from None
    if not isinstance(text, str):
        raise FormatError(f"{path}: corrupted metadata: {key} is not text")
    check_plain(value, f"{path}: {key}")
    return value


def load_safetensors(path, name=None):
    from safetensors import safe_open

    header = read_safetensors_header(path)
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or metadata.get("format") != SAFETENSORS_FORMAT:
        raise NotAHypernetworkError(
            f"{path}: not a hypernet safetensors file (its metadata lacks format={SAFETENSORS_FORMAT}); "
            "LoRA and checkpoint files are not hypernetworks"
        )
    decoded = {
        key: _metadata_value(metadata, key, path, HypernetworkConfig.absent_value(setting))
        for key, setting in PT_KEYS.items()
    }
    widths = _metadata_value(metadata, "widths", path, None)
    pt_keys = _metadata_value(metadata, "pt_keys", path, None)
    legacy = _metadata_value(metadata, "pt_legacy_layout", path, False)
    extra = _metadata_value(metadata, "pt_extra", path, {})
    if not isinstance(widths, list) or not widths or not all(isinstance(w, int) for w in widths):
        raise FormatError(
            f"{path}: corrupted metadata: widths {str(metadata.get('widths'))[:80]!r} is not a list of integers"
        )
    if len(set(widths)) != len(widths):
        twice = next(w for w in widths if widths.count(w) > 1)
        raise FormatError(f"{path}: corrupted metadata: widths lists {twice} twice")
    if pt_keys is not None and (not isinstance(pt_keys, list) or not all(isinstance(k, str) for k in pt_keys)):
        raise FormatError(f"{path}: corrupted metadata: pt_keys is not a list of names")
    if not isinstance(legacy, bool) or not isinstance(extra, dict):
        raise FormatError(f"{path}: corrupted metadata: pt_legacy_layout or pt_extra has the wrong type")
    meta = {attribute: decoded[key] for key, attribute in PT_KEYS.items()}
    meta["name"] = meta["name"] if meta["name"] is not None else name
    names = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        width, side, rest = (key.split(".", 2) + ["", ""])[:3]
        if side not in ("k", "v") or not width.isdigit():
            raise FormatError(f"{path}: unexpected tensor {key[:80]!r}; names look like '768.k.linear.0.weight'")
        if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPES:
            raise FormatError(f"{path}: tensor {key} is not float16/32/64 or bfloat16")
        names[key] = f"layers.{width}.{'kv'.index(side)}.{rest}"
    shapes = {}
    for key, target in names.items():
        shape = header[key].get("shape")
        if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape):
            raise FormatError(f"{path}: tensor {key} has no valid shape")
        shapes[target] = tuple(shape)
    check_fit(path, meta_hypernetwork(path, widths, meta), shapes)  # before a byte of the tensors is read
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            tensors = {names[key]: f.get_tensor(key) for key in names}
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        reason = first_line(e) or repr(e)
        raise FormatError(f"{path}: corrupted safetensors file ({reason})") from None
    return build(path, widths, meta, tensors), FileLayout(pt_keys, legacy, extra)


def check_path(path):
    """A file's path as a str: a str or an os.PathLike; bytes (a file's content?) and anything else refused."""
    if not isinstance(path, (str, os.PathLike)) or isinstance(os.fspath(path), bytes):
        raise ArgumentError("path", f"a {type(path).__name__}: give the file's path (a str or os.PathLike)")
    return os.fspath(path)


def read(path: str | os.PathLike, optimizer_state: bool = False) -> HypernetworkFile:
    """A webui .pt (either layout) or a .safetensors file, as a HypernetworkFile; anything else is one FormatError.

    The hypernetwork comes in eval mode without gradients. `optimizer_state`: also read the .optim companion (to
    continue training, or to convert it along), kept where it belongs to this exact file (its hash) and fits;
    otherwise `optimizer` stays None and a warning says why.
    """
    path = check_path(path)
    name = os.path.splitext(os.path.basename(path))[0]
    if path.lower().endswith(".safetensors"):
        hn, layout = load_safetensors(path, name)
    else:
        hn, layout = hypernetwork_from_pt_dict(torch_load_safely(path), path, name)
    hn.eval()
    hn.requires_grad_(False)
    optimizer = read_optimizer_state(path, list(hn.parameters())) if optimizer_state else None
    return HypernetworkFile(hn, layout, optimizer)


def load(path: str | os.PathLike) -> Hypernetwork:
    """The hypernetwork in a webui .pt or a .safetensors file (see read), in eval mode without gradients."""
    return read(path).hypernetwork
