"""Reading and writing hypernetwork files: A1111's .pt (both layouts), safetensors, and the .optim companion.

The .pt layout is AUTOMATIC1111's own (docs/format.md): {width: (k_state_dict, v_state_dict), ..., metadata}.
Every .pt is read with torch.load(weights_only=True), so a file that needs arbitrary unpickling is refused
before anything in it runs.
"""

import hashlib
import io
import json
import os
import pickle
import re
import secrets
import struct
import warnings
import zipfile
from collections import OrderedDict
from contextlib import contextmanager

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import save_file as save_safetensors_file

from .errors import FormatError, HypernetError, NotAHypernetworkError
from .module import LOAD_DEFAULTS, Hypernetwork

# A1111's file keys, in the order its Hypernetwork.save() writes them, and the attribute each one holds.
PT_KEYS = {
    "step": "step",
    "name": "name",
    "layer_structure": "layer_structure",
    "activation_func": "activation_func",
    "is_layer_norm": "add_layer_norm",
    "weight_initialization": "weight_init",
    "sd_checkpoint": "sd_checkpoint",
    "sd_checkpoint_name": "sd_checkpoint_name",
    "activate_output": "activate_output",
    "use_dropout": "use_dropout",
    "dropout_structure": "dropout_structure",
    "last_layer_dropout": "last_layer_dropout",
    "optional_info": "optional_info",
}
# The pre-2022-10 layout named the two Linears of a [1, 2, 1] module linear1 and linear2, and held each width's
# pair of OrderedDicts in a list where the current one holds a tuple.
LEGACY_NAMES = {"linear1.": "linear.0.", "linear2.": "linear.1."}
SAFETENSORS_FORMAT = "hypernet.a1111"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OPTIM_SUFFIX = ".optim"


def shorthash(path):
    """A1111's short hash of a file: the first 10 hex characters of the sha256 of its bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


@contextmanager
def atomic_write(path):
    """Yield a temporary path beside `path`; it is renamed onto `path` only when the block succeeds.

    The temporary file is created with the umask's mode, as open() would create `path` itself.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise HypernetError(
            f"{path}: could not write ({e.strerror or e}); the previous file, if any, is intact"
        ) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# The zip members every webui 1.x admits (modules/safe.py, v1.0 to v1.9.4; v1.10 also admits byteorder and
# .data/serialization_id). Recent torch.save also writes .format_version and .storage_alignment, which every
# webui refuses, so a .pt is written with these members alone.
WEBUI_RECORD = re.compile(r"data\.pkl|data/\d+|version")
STORAGE_ALIGNMENT = 64


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


def torch_load_safely(path):
    """torch.load(weights_only=True), with every failure turned into one FormatError naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported" in str(e) or "global" in str(e).lower():
            raise FormatError(
                f"{path}: refused, the file needs arbitrary code to unpickle (not a plain hypernetwork); "
                "nothing in it was run. Load only files you trust, or ask the author for a .safetensors"
            ) from None
        raise FormatError(f"{path}: not a readable PyTorch file ({e}); it may be truncated or corrupted") from None
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FormatError(f"{path}: is a folder, not a hypernetwork file") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, zipfile and struct errors for damaged files
        raise FormatError(
            f"{path}: not a readable PyTorch file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "it may be truncated or corrupted"
        ) from None


def _modern_state_dict(module_state, legacy):
    if not isinstance(module_state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in module_state.items()
    ):
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
    """Build a Hypernetwork from the dict in an A1111 .pt file, taking A1111's load defaults for absent keys."""
    if not isinstance(data, dict):
        raise NotAHypernetworkError(f"{path}: not a hypernetwork (the file holds a {type(data).__name__}, not a dict)")
    widths = [key for key in data if isinstance(key, int) and not isinstance(key, bool)]
    if not widths:
        raise NotAHypernetworkError(f"{path}: not a hypernetwork (no integer width keys such as 768 or 320)")
    meta = {attribute: data.get(key, LOAD_DEFAULTS[attribute]) for key, attribute in PT_KEYS.items()}
    if meta["dropout_structure"] is not None and any(meta["dropout_structure"]):
        meta["use_dropout"] = True
    legacy = any(
        isinstance(data[w], (tuple, list))
        and data[w]
        and isinstance(data[w][0], dict)
        and "linear1.weight" in data[w][0]
        for w in widths
    )
    meta["name"] = meta["name"] if meta["name"] is not None else name
    hn = _build(path, widths, meta)
    hn.pt_keys = [key for key in data if not isinstance(key, int) or isinstance(key, bool)]
    hn.pt_legacy_layout = legacy
    hn.extra_pt_metadata = {key: data[key] for key in hn.pt_keys if key not in PT_KEYS}
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
    _load_tensors(hn, tensors, path)
    return hn


def _build(path, widths, meta):
    try:
        hn = Hypernetwork(
            widths,
            **{key: value for key, value in meta.items() if key != "weight_init"},
        )
    except HypernetError as e:
        raise FormatError(f"{path}: {e}") from None
    except (TypeError, ValueError) as e:
        raise FormatError(f"{path}: malformed hypernetwork settings ({e})") from None
    # Loaded weights overwrite the initialisation, so keep the file's value even if we do not know it.
    hn.weight_init = meta["weight_init"]
    hn.use_dropout = meta["use_dropout"]
    hn.last_layer_dropout = meta["last_layer_dropout"]
    return hn


def _load_tensors(hn, tensors, path):
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) == 1 and next(iter(dtypes)).is_floating_point:
        hn.to(next(iter(dtypes)))
    expected = hn.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise FormatError(
            f"{path}: its weights do not fit its settings (layer_structure {hn.layer_structure}, activation "
            f"{hn.activation_func!r}, layer norm {hn.add_layer_norm}): "
            + (f"missing {missing[:3]} " if missing else "")
            + (f"unexpected {unexpected[:3]}" if unexpected else "")
        )
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape:
            raise FormatError(
                f"{path}: {key} has shape {tuple(tensor.shape)} but layer_structure {hn.layer_structure} "
                f"needs {tuple(expected[key].shape)}"
            )
    hn.load_state_dict(tensors)


def pt_dict(hn, dtype=None):
    """The dict A1111's Hypernetwork.save() writes, key for key and type for type."""
    data = {}
    for width in hn.widths:
        k, v = hn.pair(width)
        pair = [_pt_state_dict(k, hn.pt_legacy_layout, dtype), _pt_state_dict(v, hn.pt_legacy_layout, dtype)]
        data[width] = pair if hn.pt_legacy_layout else tuple(pair)
    keys = hn.pt_keys if hn.pt_keys is not None else list(PT_KEYS)
    for key in keys:
        if key in PT_KEYS:
            value = getattr(hn, PT_KEYS[key])
            data[key] = (value or None) if key == "optional_info" else value
        else:
            data[key] = hn.extra_pt_metadata.get(key)
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


def save(hn, path, optimizer_state_dict=None, optimizer_name=None, dtype=None):
    """Write `hn` to `path` (.pt in A1111's layout, or .safetensors), and its optimizer state to `path`.optim.

    Each file is written under a temporary name and renamed into place.
    """
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        tensors, metadata = safetensors_tensors_and_metadata(hn, dtype)
        with atomic_write(path) as tmp:
            save_safetensors_file(tensors, tmp, metadata=metadata)
    elif path.endswith(".pt"):
        with atomic_write(path) as tmp:
            torch_save_for_webui(pt_dict(hn, dtype), tmp, path)
    else:
        raise HypernetError(f"{path}: unknown format; name the file .pt (A1111) or .safetensors")
    if optimizer_state_dict is not None:
        optim = {
            "optimizer_name": optimizer_name or "AdamW",
            "hash": shorthash(path),
            "optimizer_state_dict": optimizer_state_dict,
        }
        with atomic_write(path + OPTIM_SUFFIX) as tmp:
            torch_save_for_webui(optim, tmp, path + OPTIM_SUFFIX)


def safetensors_tensors_and_metadata(hn, dtype=None):
    tensors = {}
    for width in hn.widths:
        for side, module in zip("kv", hn.pair(width)):
            for key, tensor in module.state_dict().items():
                tensors[f"{width}.{side}.{key}"] = tensor.detach().to("cpu", dtype=dtype or tensor.dtype).contiguous()
    metadata = {"format": SAFETENSORS_FORMAT, "format_version": "1", "widths": json.dumps(hn.widths)}
    metadata.update({key: json.dumps(getattr(hn, attribute)) for key, attribute in PT_KEYS.items()})
    metadata["pt_keys"] = json.dumps(hn.pt_keys if hn.pt_keys is not None else list(PT_KEYS))
    metadata["pt_legacy_layout"] = json.dumps(hn.pt_legacy_layout)
    if hn.extra_pt_metadata:
        metadata["pt_extra"] = json.dumps(hn.extra_pt_metadata, default=str)
    return tensors, metadata


def read_safetensors_header(path):
    """The JSON header of a safetensors file, checked for sane sizes before anything else is read."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise FormatError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, 100 << 20):
            raise FormatError(f"{path}: corrupted safetensors header (it claims {length} bytes, the file has {size})")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise FormatError(f"{path}: corrupted safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: corrupted safetensors header (not a JSON object)")
    return header


def load_safetensors(path, name=None):
    header = read_safetensors_header(path)
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or metadata.get("format") != SAFETENSORS_FORMAT:
        raise NotAHypernetworkError(
            f"{path}: not a hypernet safetensors file (its metadata lacks format={SAFETENSORS_FORMAT}); "
            "LoRA and checkpoint files are not hypernetworks"
        )
    try:
        tensors = load_safetensors_file(path, device="cpu")
        decoded = {key: json.loads(metadata[key]) for key in PT_KEYS if key in metadata}
        widths = json.loads(metadata["widths"])
        pt_keys = json.loads(metadata.get("pt_keys", "null"))
        legacy = bool(json.loads(metadata.get("pt_legacy_layout", "false")))
        extra = json.loads(metadata.get("pt_extra", "{}"))
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise FormatError(
            f"{path}: corrupted safetensors file ({str(e).splitlines()[0] if str(e) else e!r})"
        ) from None
    if not isinstance(widths, list) or not widths or not all(isinstance(w, int) for w in widths):
        raise FormatError(f"{path}: corrupted metadata: widths {metadata.get('widths')!r} is not a list of integers")
    meta = {attribute: decoded.get(key, LOAD_DEFAULTS[attribute]) for key, attribute in PT_KEYS.items()}
    meta["name"] = meta["name"] if meta["name"] is not None else name
    hn = _build(path, widths, meta)
    hn.pt_keys = pt_keys
    hn.pt_legacy_layout = legacy
    hn.extra_pt_metadata = extra if isinstance(extra, dict) else {}
    renamed = {}
    for key, tensor in tensors.items():
        width, side, rest = (key.split(".", 2) + ["", ""])[:3]
        if side not in ("k", "v"):
            raise FormatError(f"{path}: unexpected tensor {key!r}; names look like '768.k.linear.0.weight'")
        renamed[f"layers.{width}.{'kv'.index(side)}.{rest}"] = tensor
    _load_tensors(hn, renamed, path)
    return hn


def load(path):
    """Read a hypernetwork from an A1111 .pt (any layout) or a .safetensors file.

    If `path`.optim exists and its hash matches this file, its optimizer state is exposed as
    hn.optimizer_state_dict and hn.optimizer_name; otherwise both stay None and a warning says why.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FormatError(f"{path}: no such file" if not os.path.exists(path) else f"{path}: not a file")
    name = os.path.splitext(os.path.basename(path))[0]
    if path.endswith(".safetensors"):
        hn = load_safetensors(path, name)
    else:
        hn = hypernetwork_from_pt_dict(torch_load_safely(path), path, name)
    hn.eval()
    hn.requires_grad_(False)
    load_optimizer_state(hn, path)
    return hn


def load_optimizer_state(hn, path):
    """Attach the .optim companion's state to `hn` when it belongs to this exact file; warn and skip otherwise."""
    optim_path = path + OPTIM_SUFFIX
    hn.optimizer_name = None
    hn.optimizer_state_dict = None
    if not os.path.exists(optim_path):
        return
    try:
        saved = torch_load_safely(optim_path)
    except FormatError as e:
        warnings.warn(f"ignoring optimizer state: {e}", stacklevel=3)
        return
    if not isinstance(saved, dict) or not isinstance(saved.get("optimizer_state_dict"), dict):
        warnings.warn(f"ignoring optimizer state: {optim_path} holds no optimizer_state_dict", stacklevel=3)
        return
    expected = shorthash(path)
    if saved.get("hash") != expected:
        warnings.warn(
            f"ignoring optimizer state: {optim_path} was saved for another file (hash {saved.get('hash')!r}, "
            f"{os.path.basename(path)} has {expected}); training restarts the optimizer",
            stacklevel=3,
        )
        return
    problem = optimizer_state_mismatch(saved["optimizer_state_dict"], list(hn.parameters()))
    if problem:
        warnings.warn(f"ignoring optimizer state: {optim_path}: {problem}", stacklevel=3)
        return
    hn.optimizer_name = saved.get("optimizer_name") or "AdamW"
    hn.optimizer_state_dict = saved["optimizer_state_dict"]


def optimizer_state_mismatch(state_dict, parameters):
    """Why an optimizer state dict cannot belong to these parameters (A1111's order), or None if it can."""
    groups = state_dict.get("param_groups")
    state = state_dict.get("state")
    if not isinstance(groups, list) or not isinstance(state, dict):
        return "not an optimizer state dict (no param_groups/state)"
    indices = [i for group in groups if isinstance(group, dict) for i in group.get("params", [])]
    if len(indices) != len(parameters):
        return f"it is for {len(indices)} parameters, the hypernetwork has {len(parameters)}"
    position = {index: n for n, index in enumerate(indices)}
    for index, values in state.items():
        if index not in position or not isinstance(values, dict):
            return f"it has state for unknown parameter {index!r}"
        shape = parameters[position[index]].shape
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != shape:
                return f"{key} of parameter {index} has shape {tuple(value.shape)}, the weight has {tuple(shape)}"
    return None


def hash_cache_path():
    """Where file hashes are cached: $HYPERNET_CACHE_DIR/hashes.json, else ~/.cache/hypernet/hashes.json."""
    root = os.environ.get("HYPERNET_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "hypernet"
    )
    return os.path.join(root, "hashes.json")


def cached_sha256(path):
    """The sha256 of a file's bytes, cached by its real path, size and modification time as the webui caches its
    hashes, so that a multi-gigabyte model is read once, not at every start."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    cache_path = hash_cache_path()
    try:
        with open(cache_path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    entry = cache.get(real) if isinstance(cache, dict) else None
    if isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(real, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    cache = cache if isinstance(cache, dict) else {}
    cache[real] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
    try:
        with atomic_write(cache_path) as tmp, open(tmp, "w") as f:
            json.dump(cache, f)
    except HypernetError:
        pass  # an unwritable cache only costs the next start another read
    return digest.hexdigest()


def weights_files(folder, subfolder):
    """A diffusers model's weights files in `subfolder`: the shards its index names, else its one weights file
    (.safetensors before .bin, the plain file before variants such as .fp16), sorted."""
    directory = os.path.join(folder, subfolder)
    if not os.path.isdir(directory):
        return []
    names = sorted(os.listdir(directory))
    for suffix in (".safetensors", ".bin"):
        for index in (n for n in names if n.endswith(suffix + ".index.json")):
            try:
                with open(os.path.join(directory, index)) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
                return [os.path.join(directory, n) for n in shards]
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
        found = [n for n in names if n.endswith(suffix)]
        plain = [n for n in found if n.count(".") == 1]
        if found:
            return [os.path.join(directory, n) for n in (plain or found)[:1]]
    return []


def weights_id(folder, subfolder):
    """A short hash naming a model component's weights (all its weights files), or None if it has none on disk."""
    files = weights_files(folder, subfolder)
    if not files:
        return None
    if len(files) == 1:
        return cached_sha256(files[0])[:10]
    return hashlib.sha256("".join(cached_sha256(f) for f in files).encode()).hexdigest()[:10]


def base_model_hash(path):
    """The short hash recorded as sd_checkpoint: the webui's for a single checkpoint file; for a diffusers folder,
    the same hash of its UNet's weights (a diffusers folder has no single file that the webui would hash)."""
    if os.path.isfile(path):
        return cached_sha256(path)[:10]
    return weights_id(path, "unet")
