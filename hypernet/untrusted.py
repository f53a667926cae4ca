"""Reading files that may hold anything: every field's type and range checked, nesting, sizes and zip inflation
bounded, torch files read with weights_only. No file can make a command use much more time or memory than its own
tensors call for, and nothing in a file runs.
"""

import json
import math
import os
import pickle
import stat
import struct
import warnings
import zipfile

import torch

from .errors import FormatError, first_line
from .files import read_failure

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
