"""File hashes as the webui computes them (its short hash, AutoV2), and the hashes that name a model's weights."""

import hashlib
import json
import os

from .errors import HypernetError
from .files import atomic_write, read_failure


def shorthash(path: str | os.PathLike) -> str:
    """A1111's short hash of a file: the first 10 hex characters of the sha256 of its bytes."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise read_failure(path, e) from None
    return digest.hexdigest()[:10]


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
