"""Reading and writing hypernetwork files: A1111's .pt (both layouts), safetensors, and the .optim companion.

The .pt layout is AUTOMATIC1111's own (docs/format.md): {width: (k_state_dict, v_state_dict), ..., metadata}.
Every .pt is read with torch.load(weights_only=True), so a file that needs arbitrary unpickling is refused
before anything in it runs.
"""

import errno
import hashlib
import io
import json
import math
import os
import pickle
import re
import secrets
import shutil
import stat
import struct
import warnings
import zipfile
from collections import OrderedDict
from contextlib import contextmanager

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file as save_safetensors_file

from .errors import FormatError, HypernetError, NotAHypernetworkError, UsageError, first_line
from .modelspec import modelspec_metadata
from .module import ACTIVATIONS, LOAD_DEFAULTS, Hypernetwork

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
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise read_failure(path, e) from None
    return digest.hexdigest()[:10]


def read_failure(path, error):
    """The FormatError for an OSError while reading `path`: a "regular" file whose read fails (/proc/self/mem, a
    failing disk, a network mount gone away) is refused by name."""
    return FormatError(f"{path}: cannot be read ({error.strerror or first_line(error) or type(error).__name__})")


def write_failure(error, path):
    """Why a write failed, in a few words, with the free space where the disk is full; None where `error` does not
    look like a failed write (torch and safetensors report full disks as RuntimeError and SafetensorError)."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        free = shutil.disk_usage(directory if os.path.isdir(directory) else ".").free
    except OSError:
        free = None
    text = str(error).lower()
    full = getattr(error, "errno", None) == errno.ENOSPC or any(
        w in text for w in ("space", "storagefull", "unexpected pos")
    )
    if full or (free is not None and free < 1 << 20 and not isinstance(error, OSError)):
        return "no space left on the device" + (f": {free / 2**20:.1f} MiB free" if free is not None else "")
    if isinstance(error, OSError):
        return error.strerror or str(error)
    if any(word in text for word in ("write", "i/o", "file", "permission")):
        return first_line(error)
    return None


def check_writable_folder(path, flag="--output_dir"):
    """A folder that exists or can be made, and can be written to; else one UsageError naming the flag."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"{flag} {path}: not writable ({e.strerror})") from None


@contextmanager
def atomic_writes(paths):
    """Temporary paths beside each of `paths`, renamed into place together once the block succeeds: the files are
    replaced all or none (a failure leaves the previous ones whole). The files get the umask's mode, as open()
    would give them, also where a writer creates its temporary file anew (safetensors' save_file makes it 0600)."""
    temporaries, modes, current = [], [], None
    try:
        for path in paths:
            current = path
            directory = os.path.dirname(os.path.abspath(path))
            os.makedirs(directory, exist_ok=True)
            tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            temporaries.append(tmp)
            modes.append(stat.S_IMODE(os.stat(tmp).st_mode))
        current = paths[0]
        yield temporaries
        for path, tmp, mode in zip(paths, temporaries, modes):
            current = path
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
                os.fchmod(f.fileno(), mode)
        for path, tmp in zip(paths, temporaries):
            os.replace(tmp, path)
    except (OSError, RuntimeError, SafetensorError) as e:
        reason = write_failure(e, current)
        if reason is None:
            raise
        raise HypernetError(f"{current}: could not write ({reason}); the previous file, if any, is intact") from e
    finally:
        for tmp in temporaries:
            if os.path.exists(tmp):
                os.remove(tmp)


@contextmanager
def atomic_write(path):
    """A temporary path beside `path`, renamed onto it only when the block succeeds (see atomic_writes)."""
    with atomic_writes([path]) as (tmp,):
        yield tmp


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


# -- reading: every file is untrusted -------------------------------------------------------------------------
# A file may hold anything. Reading checks each field's type and range, bounds nesting, sizes and zip inflation,
# and builds modules only after the file's tensors have been checked against the settings (on the meta device, so
# settings that call for huge layers allocate nothing): no file can make a command use much more time or memory
# than its own tensors call for.

MAX_WIDTH = 16384
MAX_LAYER_MULTIPLE = 64
MAX_LAYERS = 32
MAX_TEXT = 1 << 16
MAX_VALUES = 10_000  # values in a file's metadata, counted at every reference, so shared ones cannot multiply
MAX_OPTIM_VALUES = 1_000_000
MAX_NESTING = 16
MAX_HEADER = 16 << 20
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SAFETENSORS_DTYPES = {"F16", "BF16", "F32", "F64"}


def regular_file(path):
    """The size of a regular file; anything else (missing, a folder, a pipe, a device) is refused by name."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except OSError as e:
        raise read_failure(path, e) from None
    if stat.S_ISDIR(info.st_mode):
        raise FormatError(f"{path}: is a folder, not a hypernetwork file")
    if not stat.S_ISREG(info.st_mode):
        raise FormatError(f"{path}: not a regular file (a pipe or a device); hypernet reads only files")
    return info.st_size


def file_kind(path, size):
    """'zip', 'pickle' (torch's format before 1.6), 'tar', 'safetensors', or None, from the first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise read_failure(path, e) from None
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) > 8 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"
    if head[257:262] == b"ustar":
        return "tar"
    if head[:1] == b"\x80":
        return "pickle"
    return None


def check_zip(path, size):
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise FormatError(f"{path}: not a readable PyTorch file ({e}); it may be truncated or corrupted") from None
    claimed = sum(member.file_size for member in members)
    if claimed > 2 * size + (1 << 20) or len(members) > 100_000:
        raise FormatError(
            f"{path}: its zip members claim {claimed:,} bytes in a file of {size:,}: refused (a zip bomb or a "
            "damaged file)"
        )


def torch_load_safely(path):
    """torch.load(weights_only=True) of a checked file, with every failure turned into one FormatError naming it."""
    size = regular_file(path)
    kind = file_kind(path, size)
    if kind == "safetensors":
        raise FormatError(f"{path}: a safetensors file: name it .safetensors")
    if kind == "tar":
        raise FormatError(
            f"{path}: a torch file in the old tar format, which cannot be read safely; re-save it with a current "
            "torch or the webui"
        )
    if kind is None:
        raise FormatError(f"{path}: not a PyTorch file")
    if kind == "zip":
        check_zip(path, size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported" in str(e) or "global" in str(e).lower():
            raise FormatError(
                f"{path}: refused, the file needs arbitrary code to unpickle (not a plain hypernetwork); "
                "nothing in it was run. Load only files you trust, or ask the author for a .safetensors"
            ) from None
        raise FormatError(f"{path}: not a readable PyTorch file; it may be truncated or corrupted") from None
    except RecursionError:
        raise FormatError(f"{path}: nested too deeply to be a hypernetwork file") from None
    except MemoryError:
        raise FormatError(f"{path}: too large to read") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, zipfile and struct errors for damaged files
        reason = first_line(e)
        raise FormatError(
            f"{path}: not a readable PyTorch file ({type(e).__name__}: {reason}); it may be truncated or corrupted"
        ) from None


def check_plain(value, where, budget=None, depth=0, tensors=False):
    """Walk a loaded structure once: plain data (and tensors where allowed) within bounds of size and nesting."""
    budget = budget if budget is not None else [MAX_VALUES]
    budget[0] -= 1
    if budget[0] < 0:
        raise FormatError(f"{where}: too large a structure (more than {MAX_VALUES:,} values) for a hypernetwork file")
    if depth > MAX_NESTING:
        raise FormatError(f"{where}: nested more than {MAX_NESTING} deep")
    if isinstance(value, torch.Tensor):
        if not tensors:
            raise FormatError(f"{where}: holds a tensor where a setting belongs")
    elif isinstance(value, str):
        if len(value) > MAX_TEXT:
            raise FormatError(f"{where}: a text of {len(value):,} characters, more than {MAX_TEXT:,}")
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_plain(item, where, budget, depth + 1, tensors)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_plain(key, where, budget, depth + 1)
            check_plain(item, where, budget, depth + 1, tensors)
    elif value is not None and not isinstance(value, (bool, int, float)):
        raise FormatError(f"{where}: holds a {type(value).__name__}, which a hypernetwork file does not")


def check_number(value, what, whole=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FormatError(f"{what} is {value!r}, not a finite number")
    if whole and value != int(value):
        raise FormatError(f"{what} is {value!r}, not a whole number")
    return int(value) if whole else value


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
            f"unknown activation_func {str(meta['activation_func'])[:40]!r}; use one of: {', '.join(sorted(ACTIVATIONS))}"
        )
    dropout = meta["dropout_structure"]
    if dropout is not None:
        if not isinstance(dropout, (list, tuple)) or len(dropout) != len(layers):
            raise FormatError(f"dropout_structure {str(dropout)[:80]} must have one entry per layer_structure entry")
        for p in dropout:
            check_number(p, "dropout_structure entry")


def check_tensor(tensor, where):
    if not isinstance(tensor, torch.Tensor):
        raise FormatError(f"{where} is a {type(tensor).__name__}, not a tensor")
    if tensor.layout != torch.strided or tensor.is_meta:
        raise FormatError(f"{where} is a {tensor.layout if tensor.layout != torch.strided else 'meta'} tensor")
    if tensor.dtype not in FLOAT_DTYPES:
        raise FormatError(
            f"{where} holds {str(tensor.dtype).replace('torch.', '')}; weights are float16/32/64 or bfloat16"
        )


def check_width(width):
    if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= MAX_WIDTH:
        raise FormatError(f"width {str(width)[:40]} is not a whole number from 1 to {MAX_WIDTH}")


def meta_hypernetwork(path, widths, meta):
    """The Hypernetwork these settings describe, built on the meta device: nothing is allocated, however large the
    layers they call for."""
    try:
        check_settings(meta)
        for width in widths:
            check_width(width)
        with torch.device("meta"):
            return Hypernetwork(widths, **{key: value for key, value in meta.items() if key != "weight_init"})
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
            f"{path}: its weights do not fit its settings (layer_structure {hn.layer_structure}, activation "
            f"{hn.activation_func!r}, layer norm {hn.add_layer_norm}): "
            + (f"missing {missing[:3]} " if missing else "")
            + (f"unexpected {unexpected[:3]}" if unexpected else "")
        )
    for key, shape in shapes.items():
        if tuple(shape) != expected[key]:
            raise FormatError(
                f"{path}: {key} has shape {tuple(shape)} but layer_structure {hn.layer_structure} needs {expected[key]}"
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
    # Loaded weights overwrite the initialisation, so keep the file's values even where hypernet does not use them.
    hn.weight_init = meta["weight_init"]
    hn.use_dropout = meta["use_dropout"]
    hn.last_layer_dropout = meta["last_layer_dropout"]
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
    """Build a Hypernetwork from the dict in a webui .pt file, taking the webui's load defaults for absent keys."""
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
    meta = {attribute: data.get(key, LOAD_DEFAULTS[attribute]) for key, attribute in PT_KEYS.items()}
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
    hn.pt_keys = keys
    hn.pt_legacy_layout = legacy
    hn.extra_pt_metadata = {key: data[key] for key in keys if key not in PT_KEYS}
    return hn


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


def save(hn, path, optimizer_state_dict=None, optimizer_name=None, dtype=None, metadata=None):
    """Write `hn` to `path` (.pt in A1111's layout, or .safetensors), and its optimizer state to `path`.optim.
    A .safetensors file also carries ModelSpec keys (hypernet.modelspec); `metadata`: more text keys for its
    metadata, which may replace those (how it was trained); a .pt holds only the webui's keys.

    Both are written under temporary names and renamed into place together: a failure (a full disk) leaves the
    previous pair whole.
    """
    path = os.fspath(path)
    if not path.endswith((".pt", ".safetensors")):
        raise HypernetError(f"{path}: unknown format; name the file .pt (A1111) or .safetensors")
    paths = [path] if optimizer_state_dict is None else [path, path + OPTIM_SUFFIX]
    with atomic_writes(paths) as temporaries:
        if path.endswith(".safetensors"):
            tensors, own = safetensors_tensors_and_metadata(hn, dtype)
            clashing = sorted(set(own) & set(metadata or {}))
            if clashing:
                raise HypernetError(f"{path}: metadata keys {clashing} are the format's own")
            stem = os.path.splitext(os.path.basename(path))[0]
            described = {**modelspec_metadata(hn, stem), **{k: str(v) for k, v in (metadata or {}).items()}}
            save_safetensors_file(tensors, temporaries[0], metadata={**own, **described})
        else:
            torch_save_for_webui(pt_dict(hn, dtype), temporaries[0], path)
        if optimizer_state_dict is not None:
            optim = {
                "optimizer_name": optimizer_name or "AdamW",
                "hash": shorthash(temporaries[0]),  # the bytes the file will have
                "optimizer_state_dict": optimizer_state_dict,
            }
            torch_save_for_webui(optim, temporaries[1], paths[1])


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
    size = regular_file(path)
    try:
        return _read_safetensors_header(path, size)
    except OSError as e:
        raise read_failure(path, e) from None


def _read_safetensors_header(path, size):
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise FormatError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, MAX_HEADER):
            if file_kind(path, size) in ("zip", "pickle"):
                raise FormatError(f"{path}: a PyTorch file: name it .pt")
            raise FormatError(f"{path}: corrupted safetensors header (it claims {length} bytes, the file has {size})")
        try:
            header = json.loads(f.read(length), object_pairs_hook=unique_keys)
        except DuplicateKey as e:
            raise FormatError(f"{path}: corrupted safetensors header (the key {e.key[:80]!r} appears twice)") from None
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise FormatError(f"{path}: corrupted safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: corrupted safetensors header (not a JSON object)")
    return header


class DuplicateKey(ValueError):
    def __init__(self, key):
        super().__init__(key)
        self.key = key


def unique_keys(pairs):
    """json's object_pairs_hook that refuses a key given twice (json.loads would keep the last one silently)."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise DuplicateKey(key)
        obj[key] = value
    return obj


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
        key: _metadata_value(metadata, key, path, LOAD_DEFAULTS[attribute]) for key, attribute in PT_KEYS.items()
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
    hn = build(path, widths, meta, tensors)
    hn.pt_keys = pt_keys
    hn.pt_legacy_layout = legacy
    hn.extra_pt_metadata = extra
    return hn


def load(path, optimizer_state=False):
    """Read a hypernetwork from a webui .pt (any layout) or a .safetensors file; anything else is one FormatError.

    The .optim companion is read only when asked (training, converting): where it is a regular file that belongs to
    this exact file (its hash) and is well formed, its state is exposed as hn.optimizer_state_dict and
    hn.optimizer_name; otherwise both stay None and a warning says why.
    """
    path = os.fspath(path)
    name = os.path.splitext(os.path.basename(path))[0]
    if path.lower().endswith(".safetensors"):
        hn = load_safetensors(path, name)
    else:
        hn = hypernetwork_from_pt_dict(torch_load_safely(path), path, name)
    hn.eval()
    hn.requires_grad_(False)
    hn.optimizer_name = hn.optimizer_state_dict = None
    if optimizer_state:
        load_optimizer_state(hn, path)
    return hn


def load_optimizer_state(hn, path):
    """Attach the .optim companion's state to `hn` when it belongs to this exact file; warn and skip otherwise."""
    optim_path = path + OPTIM_SUFFIX
    if not os.path.lexists(optim_path):
        return
    try:
        saved = torch_load_safely(optim_path)
        check_plain(saved, optim_path, budget=[MAX_OPTIM_VALUES], tensors=True)
        problem = optimizer_file_problem(saved, path, list(hn.parameters()))
        if not problem:
            problem = optimizer_fit_problem(saved, optim_path, list(hn.parameters()))
    except FormatError as e:
        problem = str(e)
    if problem:
        warnings.warn(f"ignoring optimizer state: {problem}; training restarts the optimizer", stacklevel=3)
        return
    hn.optimizer_name = saved.get("optimizer_name") or "AdamW"
    hn.optimizer_state_dict = saved["optimizer_state_dict"]


def optimizer_file_problem(saved, path, parameters):
    """Why a loaded .optim cannot continue training these parameters of the file at `path`, or None if it can."""
    optim_path = path + OPTIM_SUFFIX
    if not isinstance(saved, dict) or not isinstance(saved.get("optimizer_state_dict"), dict):
        return f"{optim_path} holds no optimizer_state_dict"
    if not isinstance(saved.get("optimizer_name", "AdamW"), (str, type(None))):
        return f"{optim_path}: its optimizer_name is not text"
    expected = shorthash(path)
    if saved.get("hash") != expected:
        return (
            f"{optim_path} was saved for another file (hash {str(saved.get('hash'))[:40]!r}, "
            f"{os.path.basename(path)} has {expected})"
        )
    problem = optimizer_state_mismatch(saved["optimizer_state_dict"], parameters)
    return f"{optim_path}: {problem}" if problem else None


def optimizer_fit_problem(saved, optim_path, parameters):
    """Why the saved state does not fit the optimizer it names, built with its own hyperparameters, or None."""
    from .training import optimizer_for_state, optimizer_state_problem

    name = saved.get("optimizer_name") or "AdamW"
    try:
        optimizer = optimizer_for_state(parameters, name, saved["optimizer_state_dict"])
    except ValueError as e:
        return f"{optim_path}: {e}"
    if optimizer is None:
        return None  # a class this installation lacks (bitsandbytes): the structure checked above is all we can say
    problem = optimizer_state_problem(saved["optimizer_state_dict"], optimizer, name)
    return f"{optim_path}: {problem}" if problem else None


OPTIMIZER_LEVEL_STATE = ("qmap", "absmax", "max", "new_max", "unorm", "gnorm")


def optimizer_state_mismatch(state_dict, parameters):
    """Why an optimizer state dict cannot belong to these parameters (the webui's order), or None if it can."""
    groups = state_dict.get("param_groups")
    state = state_dict.get("state")
    if not isinstance(groups, list) or not isinstance(state, dict) or not all(isinstance(g, dict) for g in groups):
        return "not an optimizer state dict (no param_groups/state)"
    indices = []
    for group in groups:
        params = group.get("params")
        if not isinstance(params, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in params):
            return "its param_groups' params are not lists of parameter numbers"
        indices += params
        for key, value in group.items():
            numbers = value if isinstance(value, (list, tuple)) and key != "params" else [value]
            for number in numbers:
                if isinstance(number, float) and not math.isfinite(number):
                    return f"its {key} is {number}"
                if isinstance(number, torch.Tensor) and not torch.isfinite(number).all():
                    return f"its {key} is not finite"
    if len(indices) != len(parameters) or len(set(indices)) != len(indices):
        return f"it is for {len(indices)} parameters, the hypernetwork has {len(parameters)}"
    position = {index: n for n, index in enumerate(indices)}
    for index, values in state.items():
        if index not in position or not isinstance(values, dict):
            return f"it has state for unknown parameter {str(index)[:20]!r}"
        shape = parameters[position[index]].shape
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                if value.layout != torch.strided or value.is_meta:
                    return f"{key} of parameter {index} is not a plain tensor"
                if value.is_floating_point() and not torch.isfinite(value).all():
                    return f"{key} of parameter {index} holds NaN or infinite values"
                # Per-weight state (moments) has the weight's shape; 8-bit AdamW's quantization maps and block
                # scales belong to the optimizer.
                if value.dim() > 0 and not key.startswith(OPTIMIZER_LEVEL_STATE) and value.shape != shape:
                    return f"{key} of parameter {index} has shape {tuple(value.shape)}, the weight has {tuple(shape)}"
            elif isinstance(value, float) and not math.isfinite(value):
                return f"{key} of parameter {index} is {value}"
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
