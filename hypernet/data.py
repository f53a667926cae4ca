"""Training data: the webui's dataset semantics, and the record store training reads.

The webui's rules (modules/textual_inversion/dataset.py): images in a folder, each with an optional same-named .txt
caption, else words from the file name; prompt templates with [filewords] and [name]; tags shuffled or dropped; the
alpha channel as a loss weight; --varsize buckets; latents sampled once, deterministically or at every use.

Images are read when they are encoded and never held. What training reads is a record store on disk: each image's
latents (mean and std, of the image and of its mirror) in a file under a key of everything they depend on (the
image's bytes, its crop, the VAE and its dtype), each distinct fixed prompt's text embedding in a file under a key
of the prompt and the text encoders, and an index of the dataset (per image: its entries, crop and captions) that
every process maps into memory. Batches read their entries when they are built, so a process's memory does not grow
with the dataset, and the processes of a node share one copy of the store in the page cache. Encoding is split
across processes and every entry depends only on its image or prompt and the settings, so the store and its index
are the same bit for bit for any number of processes, and a later run, or a resume, encodes only what changed.
"""

import hashlib
import io
import itertools
import json
import logging
import math
import os
import random
import re
import secrets
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from .errors import ArgumentError, UsageError, first_line
from .files import atomic_write, check_writable_folder
from .hashing import hash_cache_path
from .prompts import CHUNK_TOKENS, COMMA_BACKTRACK, PromptEncoder

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
LATENT_SAMPLING_METHODS = ("once", "deterministic", "random")
STORE_FORMAT = "hypernet-latents-1"  # the checksum's prefix in every store entry
CHUNK = 16  # images a process takes at a time; the same for any process count


@dataclass(frozen=True)
class DataSettings:
    """How images become training samples: the webui's dataset options, under its names."""

    name: str  # [name] in templates
    resolution: int = 512
    center_crop: bool = False
    random_flip: bool = False
    varsize: bool = False
    use_weight: bool = False
    latent_sampling_method: str = "once"
    shuffle_tags: bool = False
    tag_drop_out: float = 0.0
    seed: int = 0

    @property
    def fixed_prompts(self):
        """Whether every image's prompt is the same at every use, so that its text embedding can be cached."""
        return not (self.shuffle_tags or self.tag_drop_out)


def sample_key(seed, *parts):
    """A seed for one sample's randomness, the same whatever the number of processes or where a run resumed."""
    key = seed
    for part in parts:
        key = (key * 1_000_003 + int(part)) % (1 << 62)
    return key


# -- reading images and captions ------------------------------------------------------------------------------


def read_text(path, argument=None):
    """A text file's text: UTF-8 (with or without BOM) or UTF-16 with BOM; anything else is refused by name, as an
    ArgumentError about `argument` where the path is a function's argument of that name."""
    error = partial(ArgumentError, argument) if argument else UsageError
    try:
        if not os.path.isfile(path):
            raise error(f"{path}: no such file")
        if os.path.getsize(path) > 16 << 20:
            raise error(f"{path}: larger than 16 MiB, too large for a text file")
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror})") from None
    try:
        return raw.decode("utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig")
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 or UTF-16 text; re-save it as UTF-8") from None


def read_caption(path):
    return read_text(path).strip()


def caption_from_name(filename):
    """The webui's caption from a file name: the stem without its leading numbers and dashes."""
    return re.sub(r"^[-\d]+\s*", "", os.path.splitext(os.path.basename(filename))[0])


def decode_image(raw, label):
    """Fully decode image bytes; anything PIL cannot read is refused by name."""
    if not raw:
        raise UsageError(f"{label}: empty file (0 bytes); remove it or replace it with the real image")
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as e:
        raise UsageError(f"{label}: image too large to read safely ({e}); downscale it first") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UsageError(f"{label}: unreadable image ({e}); fix or remove it") from None


def to_rgb(image, use_weight):
    """An image of any mode PIL reads as RGB, or RGBA with use_weight when it has alpha; 16-bit scaled to 8."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / scale * 255.0, 0, 255).astype(np.uint8), "L")
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    return image.convert("RGBA" if use_weight and has_alpha else "RGB")


@dataclass(frozen=True)
class Entry:
    """One image of a dataset as encoding needs it: row `row` of shard `shard` (a folder or a map-style dataset is
    one shard), read() gives its bytes; label is the name errors give it."""

    shard: int
    row: int
    caption: str
    label: str
    read: Callable[[], bytes]


class Entries:
    """A dataset's images and captions, each read when asked for: raw(i) gives image i's bytes, caption(i) its
    caption, label(i) the name an error message gives it, source(i) its file's path where it has one, else its
    bytes."""

    streamed = False

    def __init__(self, count, read, caption, label, path=None):
        self.count, self._read, self._caption, self._label, self._path = count, read, caption, label, path

    def __len__(self):
        return self.count

    def raw(self, index):
        return self._read(index)

    def caption(self, index):
        return self._caption(index)

    def label(self, index):
        return self._label(index)

    def image(self, index, use_weight=False):
        return to_rgb(decode_image(self.raw(index), self.label(index)), use_weight)

    def source(self, index):
        return self.raw(index) if self._path is None else self._path(index)

    def entry(self, index):
        return Entry(0, index, self.caption(index), self.label(index), partial(self.raw, index))

    def chunks(self, rank=0, world_size=1):
        """This process's chunks, in order: lists of the Entry of CHUNK consecutive images, every world_size-th
        chunk from the rank-th."""
        for start in range(rank * CHUNK, len(self), world_size * CHUNK):
            yield [self.entry(i) for i in range(start, min(len(self), start + CHUNK))]


class StreamedEntries:
    """A streamed `datasets` dataset (an IterableDataset), read once, in order, as it arrives. With at least as many
    shards as processes, each process reads only its shards (shard i: process i mod processes), so the data is read
    once in all; with fewer, every process reads the stream and encodes its own chunks of it. Rows are keyed by
    (shard, row), which does not depend on the number of processes."""

    streamed = True

    def __init__(self, dataset, name, image_column, caption_column):
        self.dataset, self.name = dataset, name
        self.image_column, self.caption_column = image_column, caption_column

    @property
    def shards(self):
        return max(1, int(getattr(self.dataset, "n_shards", 1) or 1))

    def rows(self, shard):
        source = self.dataset if self.shards == 1 else self.dataset.shard(num_shards=self.shards, index=shard)
        rows = iter(source)
        index = 0
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except Exception as e:  # whatever the source raises (a lost connection, a damaged shard), in one line
                reason = first_line(e) or type(e).__name__
                raise ArgumentError(
                    "dataset_name", f"{self.name}: reading {self.where(shard, index)} failed ({reason})"
                ) from None
            yield row
            index += 1

    def where(self, shard, row):
        return f"row {row}" if self.shards == 1 else f"shard {shard} row {row}"

    def shard_chunks(self, shard):
        chunk = []
        for index, row in enumerate(self.rows(shard)):
            check_columns(self.name, row, self.image_column, self.caption_column)
            label = f"{self.name} {self.where(shard, index)}"
            chunk.append(
                Entry(
                    shard,
                    index,
                    str(row[self.caption_column]),
                    label,
                    partial(image_bytes, row[self.image_column], label, self.image_column),
                )
            )
            if len(chunk) == CHUNK:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def chunks(self, rank=0, world_size=1):
        if self.shards >= world_size:
            for shard in range(rank, self.shards, world_size):
                yield from self.shard_chunks(shard)
            return
        if rank == 0:
            logger.warning(
                f"dataset {self.name} has {self.shards} shard(s) for {world_size} processes: every "
                "process reads all of it; with as many shards as processes each would read its own"
            )
        dealt = itertools.count()
        for shard in range(self.shards):
            for chunk in self.shard_chunks(shard):
                if next(dealt) % world_size == rank:
                    yield chunk


def _read_file(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise UsageError(f"{path}: cannot be read ({e.strerror or e})") from None


def check_columns(dataset_name, columns, image_column, caption_column):
    for argument, column in (("image_column", image_column), ("caption_column", caption_column)):
        if column not in columns:
            raise ArgumentError(
                argument, f"{column!r}: {dataset_name} has no such column; it has {', '.join(columns)}"
            )


def image_bytes(value, label, column):
    """An image cell of a `datasets` dataset as file bytes: {bytes, path} when not decoded, else a PIL image."""
    if isinstance(value, dict):
        return value["bytes"] if value.get("bytes") else _read_file(value["path"])
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    raise ArgumentError("image_column", f"{column!r}: {label} holds {type(value).__name__} there, not an image")


def folder_entries(data_dir):
    """A folder in the webui's layout: every image, its .txt caption, else the words of its file name."""
    names, skipped = [], []
    with os.scandir(data_dir) as found:
        for item in found:
            if item.name.startswith(".") or not item.is_file():
                continue
            if item.name.lower().endswith(IMAGE_EXTENSIONS):
                names.append(item.name)
            elif item.name.lower().endswith((".gif", ".tif", ".tiff", ".avif", ".heic", ".jxl")):
                skipped.append(item.name)
    if skipped:
        logger.warning(
            f"{data_dir}: skipped {len(skipped)} file(s) of formats the webui does not train on: "
            f"{', '.join(sorted(skipped)[:5])}; convert them to PNG to use them"
        )
    if not names:
        raise ArgumentError("data_dir", f"{data_dir}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    names = sorted(names)
    path = lambda index: os.path.join(data_dir, names[index])  # noqa: E731
    return Entries(len(names), lambda index: _read_file(path(index)), partial(_folder_caption, path), path, path)


def _folder_caption(path, index):
    image_path = path(index)
    caption_path = os.path.splitext(image_path)[0] + ".txt"
    return read_caption(caption_path) if os.path.isfile(caption_path) else caption_from_name(image_path)


def dataset_entries(dataset_name, config_name=None, image_column="image", caption_column="text", streaming=False):
    """A `datasets` dataset (a local imagefolder, Arrow or Parquet files, or a dataset name), read lazily: images
    stay encoded in the dataset until they are needed. With `streaming`, StreamedEntries read as the data arrives."""
    try:
        import datasets
    except ImportError:
        raise ArgumentError(
            "dataset_name",
            f"{dataset_name}: needs Hugging Face datasets: pip install 'hypernet[datasets]' (or pip install "
            "datasets); a folder of images (folder_entries) works without it",
        ) from None

    try:
        if os.path.isdir(dataset_name):
            files = os.listdir(dataset_name)
            builder = "parquet" if any(f.endswith(".parquet") for f in files) else "imagefolder"
            if any(f.endswith(".arrow") for f in files):
                dataset = datasets.load_from_disk(dataset_name)
                dataset = dataset["train"] if isinstance(dataset, datasets.DatasetDict) else dataset
                dataset = dataset.to_iterable_dataset() if streaming else dataset
            else:
                dataset = datasets.load_dataset(builder, data_dir=dataset_name, split="train", streaming=streaming)
        else:
            dataset = datasets.load_dataset(dataset_name, config_name, split="train", streaming=streaming)
    except Exception as e:  # datasets raises many kinds (no such dataset, no network, an empty folder's IndexError)
        reason = first_line(e) or type(e).__name__
        raise ArgumentError("dataset_name", f"{dataset_name}: cannot be loaded ({reason})") from None
    if dataset.column_names is not None:
        check_columns(dataset_name, dataset.column_names, image_column, caption_column)
    if dataset.features is not None and isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    if streaming:
        return StreamedEntries(dataset, dataset_name, image_column, caption_column)
    if len(dataset) == 0:
        raise ArgumentError("dataset_name", f"{dataset_name}: the dataset is empty")
    images, captions = dataset.select_columns([image_column]), dataset.select_columns([caption_column])
    label = lambda index: f"{dataset_name} row {index}"  # noqa: E731
    return Entries(
        len(dataset),
        lambda index: image_bytes(images[index][image_column], label(index), image_column),
        lambda index: str(captions[index][caption_column]),
        label,
    )


def check_images(entries):
    """Read every caption and every image's header once before any model loads, so that a bad file stops the run at
    once, by name (an image whose data is damaged past its header stops every process when it is encoded)."""
    for index in range(len(entries)):
        entries.caption(index)
        label = entries.label(index)
        check_size(image_header(entries.source(index), label), label)


MAX_IMAGE_BYTES = 1 << 30


def image_header(source, label):
    """(width, height) of an image as decoded (EXIF rotations applied), from its header alone: `source` is the
    image's bytes or its file's path."""
    if not isinstance(source, bytes):
        try:
            if os.path.getsize(source) > MAX_IMAGE_BYTES:
                raise UsageError(f"{label}: larger than {MAX_IMAGE_BYTES >> 30} GiB, too large for a training image")
            with open(source, "rb") as f:
                empty = not f.read(1)
        except FileNotFoundError:
            raise UsageError(f"{label}: no such file") from None
        except OSError as e:
            raise UsageError(f"{label}: cannot be read ({e.strerror or e})") from None
    else:
        empty = not source
    if empty:
        raise UsageError(f"{label}: empty file (0 bytes); remove it or replace it with the real image")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            width, height = image.size
            rotated = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Image.DecompressionBombError as e:
        raise UsageError(f"{label}: image too large to read safely ({e}); downscale it first") from None
    except FileNotFoundError:
        raise UsageError(f"{label}: no such file") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UsageError(f"{label}: unreadable image ({e}); fix or remove it") from None
    return (height, width) if rotated else (width, height)


def check_size(size, label):
    if min(size) < 8:
        raise UsageError(f"{label}: image is {size[0]}x{size[1]}, too small to train on")


def load_template(path):
    """A template file's lines (prompts with [filewords] and [name]); no file: the caption alone."""
    if path is None:
        return ["[filewords]"]
    lines = [line.strip() for line in read_text(path, "path").splitlines() if line.strip()]
    if not lines:
        raise ArgumentError("path", f"{path}: empty; put one prompt template a line")
    if not any("[filewords]" in line for line in lines):
        logger.warning(f"{path} has no [filewords]: the images' captions are not used, every prompt comes from it")
    return lines


def make_prompt(template_line, caption, name, rng=None, shuffle_tags=False, tag_drop_out=0.0):
    """The webui's create_text: tags of the caption dropped and shuffled, then put into the template."""
    tags = caption.split(",")
    if rng is not None and tag_drop_out:
        tags = [tag for tag in tags if rng.random() > tag_drop_out]
    if rng is not None and shuffle_tags:
        rng.shuffle(tags)
    return template_line.replace("[filewords]", ",".join(tags)).replace("[name]", name)


# -- images to latents ----------------------------------------------------------------------------------------


def training_size(image_size, settings):
    """(width, height) an image trains at: --resolution square, or with --varsize its own size in steps of 64."""
    if settings.varsize:
        return max(64, image_size[0] // 64 * 64), max(64, image_size[1] // 64 * 64)
    return settings.resolution, settings.resolution


def crop_box(image_size, size, center_crop, generator):
    """(scaled width, scaled height, left, top): the image scaled so its shorter side fits `size`, and the crop."""
    width, height = size
    scale = max(width / image_size[0], height / image_size[1])
    scaled = (max(width, round(image_size[0] * scale)), max(height, round(image_size[1] * scale)))
    spare_x, spare_y = scaled[0] - width, scaled[1] - height
    if center_crop:
        return (*scaled, spare_x // 2, spare_y // 2)
    left = int(torch.randint(0, spare_x + 1, (1,), generator=generator))
    top = int(torch.randint(0, spare_y + 1, (1,), generator=generator))
    return (*scaled, left, top)


def alpha_weight(image, latent_shape):
    """The webui's loss weight from the alpha channel: resized to the latent grid, shifted to min 0, scaled to mean
    1."""
    channels, height, width = latent_shape
    if image.mode != "RGBA":
        return torch.ones(latent_shape)
    alpha = np.asarray(image.getchannel("A").resize((width, height), Image.BICUBIC), dtype=np.float32)
    weight = torch.from_numpy(alpha).expand(channels, height, width).clone()
    weight -= weight.min()
    mean = weight.mean()
    return weight / mean if mean > 0 else torch.ones(latent_shape)


def scaled_crop(image, box, size):
    scaled_w, scaled_h, left, top = box
    return image.resize((scaled_w, scaled_h), Image.BICUBIC).crop((left, top, left + size[0], top + size[1]))


def pixel_values(images):
    """PIL images as the VAE takes them: (n, 3, height, width) in [-1, 1]."""
    pixels = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)) for im in images])
    return (pixels / 127.5 - 1.0).permute(0, 3, 1, 2)


# -- the record store -----------------------------------------------------------------------------------------


def default_store_dir():
    """Where records go without --cache_dir: $HYPERNET_CACHE_DIR/records, else ~/.cache/hypernet/records."""
    return os.path.join(os.path.dirname(hash_cache_path()), "records")


def tensors_checksum(tensors):
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def entry_key(*parts):
    return hashlib.sha256(json.dumps(parts, default=str).encode()).digest()


class RecordStore:
    """Encoded records on disk, one safetensors file an entry, each with a checksum of its tensors: latents (the
    latent distribution's mean and std, of the image and its mirror), loss weights and prompt embeddings, each under
    a key of everything it depends on; and the indexes of datasets (index/). Every file is written under a
    temporary name and renamed, so several processes and runs can share the folder."""

    KINDS = {"latents": "", "weights": "weights", "prompts": "prompts"}  # latents at the top, as earlier versions

    def __init__(self, store_dir):
        self.directory = store_dir
        self.damaged = 0
        check_writable_folder(store_dir, "store_dir")

    def path(self, kind, key):
        name = key.hex()
        return os.path.join(self.directory, self.KINDS[kind], name[:2], name + ".safetensors")

    def read(self, kind, key):
        """The tensors of an entry, checked against its checksum; None where it is missing or damaged (a damaged
        one is counted and named in a warning, and is then written again)."""
        path = self.path(kind, key)
        try:
            return self._load(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
            self.damaged += 1
            warnings.warn(f"record store entry {path} is damaged ({e}); encoding it again", stacklevel=2)
            return None

    def load(self, kind, key):
        """The tensors of an entry that preparation checked; a file damaged since is one error, never trained on."""
        path = self.path(kind, key)
        try:
            return self._load(path)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
            raise UsageError(
                f"record store entry {path} was damaged during training ({e}); run again to encode it again"
            ) from None

    @staticmethod
    def _load(path):
        with open(path, "rb") as f:
            raw = f.read()
        tensors = load_safetensors_bytes(raw)
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
        if header.get("checksum") != f"{STORE_FORMAT}:{tensors_checksum(tensors)}":
            raise ValueError("checksum mismatch")
        return tensors

    def write(self, kind, key, tensors):
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        data = save_safetensors_bytes(tensors, metadata={"checksum": f"{STORE_FORMAT}:{tensors_checksum(tensors)}"})
        with atomic_write(self.path(kind, key)) as tmp, open(tmp, "wb") as f:
            f.write(data)


# One row of a dataset's index: where image (shard, row) of the dataset is in the store and how it was cropped.
INDEX_ROW = np.dtype(
    [
        ("shard", "<i4"),
        ("row", "<i8"),
        ("latents", "u1", 32),  # the key of its latents entry
        ("weights", "u1", 32),  # the key of its loss weight entry (zeros without --use_weight)
        ("prompt", "<i4"),  # its fixed prompt's row in the prompt table (-1 where prompts change at every use)
        ("chunks", "<i2"),  # the 77-token chunks of its prompt's context (with changing prompts, at most this)
        ("geometry", "<i4", 8),  # the pairs of GEOMETRY
        ("shape", "<i4", 4),  # of its latents entry's tensors: (variants, channels, height, width)
    ]
)
GEOMETRY = ("size", "original_size", "crop_top_left", "flipped_crop_top_left")  # size: (width, height)
# The files of an index folder; in its name, so that a store's indexes of another layout are not read as this one.
INDEX_LAYOUT = b"rows.npy captions.npy prompts.npy prompt_keys.npy\0"


class MappedTexts:
    """Strings in one UTF-8 array and their end offsets, as written by write_texts; memory-mapped, decoded when read."""

    def __init__(self, blob, ends):
        self.blob, self.ends = blob, ends

    def __len__(self):
        return len(self.ends)

    def __getitem__(self, index):
        start = int(self.ends[index - 1]) if index else 0
        return bytes(self.blob[start : int(self.ends[index])]).decode("utf-8")


def write_texts(folder, name, strings):
    encoded = [s.encode("utf-8") for s in strings]
    np.save(os.path.join(folder, f"{name}.npy"), np.frombuffer(b"".join(encoded), dtype=np.uint8))
    np.save(os.path.join(folder, f"{name}_ends.npy"), np.cumsum([len(e) for e in encoded], dtype=np.int64))


def read_texts(folder, name, mmap_mode):
    load = partial(np.load, mmap_mode=mmap_mode)
    return MappedTexts(load(os.path.join(folder, f"{name}.npy")), load(os.path.join(folder, f"{name}_ends.npy")))


@dataclass(slots=True)
class Record:
    """One image, as training reads it: latent means (of the image, and of its mirror with --random_flip) and their
    standard deviations; its crop; its caption and prompt; loss weight; text embedding where captions
    are fixed."""

    means: torch.Tensor  # (variants, channels, height, width): the image, then its mirror
    stds: torch.Tensor
    size: tuple  # (width, height) trained at
    original_size: tuple  # (width, height) of the image file
    crop_top_left: tuple  # (top, left) in the scaled image
    flipped_crop_top_left: tuple  # the same crop, measured in the mirrored scaled image
    caption: str  # the image's caption, [filewords] in templates
    prompt: str  # its caption in its template line where prompts are fixed, else ""
    weight: torch.Tensor = None
    embedding: torch.Tensor = None
    pooled_embedding: torch.Tensor = None


class Records:
    """Every image's record, in the dataset's order, read from the store: the index is memory-mapped (one copy per
    node in the page cache), each entry read when a batch needs it. With in_memory, every entry is read into this
    process's memory once instead, as records were held before the store (for comparison: bench/bench_data.py)."""

    def __init__(self, store, folder, in_memory=False):
        self.store, self.folder = store, folder
        mmap_mode = None if in_memory else "r"
        self.rows = np.load(os.path.join(folder, "rows.npy"), mmap_mode=mmap_mode)
        self.captions = read_texts(folder, "captions", mmap_mode)
        self.prompts = read_texts(folder, "prompts", mmap_mode)
        self.prompt_keys = np.load(os.path.join(folder, "prompt_keys.npy"), mmap_mode=mmap_mode)
        self.memory = None
        if in_memory:
            self.memory = {}
            for kind, key in self._entries():
                self.memory[kind, key] = store.load(kind, key)

    def _entries(self):
        for row in self.rows:
            yield "latents", bytes(row["latents"])
            if row["weights"].any():
                yield "weights", bytes(row["weights"])
        for key in self.prompt_keys:
            yield "prompts", bytes(key)

    def __len__(self):
        return len(self.rows)

    def entry(self, kind, key):
        return self.store.load(kind, key) if self.memory is None else self.memory[kind, key]

    def latents(self, index):
        """(means, stds) of image `index`: (variants, channels, height, width) each."""
        found = self.entry("latents", bytes(self.rows[index]["latents"]))
        return found["mean"], found["std"]

    def weight(self, index):
        key = self.rows[index]["weights"]
        return self.entry("weights", bytes(key))["weight"] if key.any() else None

    def embedding(self, index):
        """(embedding, pooled or None) of image `index`'s fixed prompt, or None where prompts change."""
        prompt = int(self.rows[index]["prompt"])
        if prompt < 0:
            return None
        found = self.entry("prompts", bytes(self.prompt_keys[prompt]))
        return found["embedding"], found.get("pooled")

    def prompt(self, index):
        prompt = int(self.rows[index]["prompt"])
        return self.prompts[prompt] if prompt >= 0 else ""

    def geometry(self, index):
        pairs = self.rows[index]["geometry"].tolist()
        return {name: tuple(pairs[2 * n : 2 * n + 2]) for n, name in enumerate(GEOMETRY)}

    def sizes(self):
        """Each image's (width, height) as trained, an array (images, 2)."""
        return np.asarray(self.rows["geometry"][:, :2])

    def chunk_counts(self):
        return np.asarray(self.rows["chunks"])

    def __getitem__(self, index):
        if not -len(self) <= index < len(self):
            raise IndexError(f"image {index} of {len(self)}")
        index %= len(self)
        embedding = self.embedding(index)
        means, stds = self.latents(index) if self.rows[index]["latents"].any() else (None, None)
        return Record(
            means=means,
            stds=stds,
            **self.geometry(index),
            caption=self.captions[index],
            prompt=self.prompt(index),
            weight=self.weight(index),
            embedding=None if embedding is None else embedding[0],
            pooled_embedding=None if embedding is None else embedding[1],
        )


@dataclass
class Encoders:
    """The frozen models data preparation uses, with what identifies their weights in store keys: the VAE and its
    dtype, the prompt encoder and the dtype its embeddings are stored in (the one training uses them in)."""

    vae: torch.nn.Module
    prompt_encoder: PromptEncoder
    device: torch.device
    dtype: torch.dtype
    vae_id: str = ""
    text_id: str = ""
    embedding_dtype: torch.dtype = torch.float32
    vae_calls: int = field(default=0)
    prompt_calls: int = field(default=0)

    def latent_shape(self, size):
        """(channels, height, width) of the latents of an image of `size` (width, height)."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return self.vae.config.latent_channels, size[1] // factor, size[0] // factor


def latent_key(content_hash, box, size, settings, encoders):
    parts = [content_hash, box, size, settings.random_flip, encoders.vae_id, str(encoders.dtype)]
    return entry_key(*parts)


def prompt_key(prompt, encoders):
    encoder = encoders.prompt_encoder
    parts = ["prompt", prompt, encoders.text_id, encoder.encoding, encoder.clip_skip, str(encoders.embedding_dtype)]
    return entry_key(*parts)


def chunks_bound(prompt, encoder):
    """The most 77-token chunks any shuffle or drop of the prompt's tags can take: read literally (brackets, weights
    and BREAK as text) the prompt has at least as many tokens as any reading of its emphasis, and a comma more a tag
    covers what rejoining tags can split; a closed chunk holds at least 56 tokens (the webui moves at most 20 back to
    a comma), and BREAK closes one more."""
    if encoder.encoding == "diffusers":
        return 1
    tokens = encoder.token_count(prompt, literal=True) + prompt.count(",")
    breaks = prompt.count("BREAK")
    if tokens <= CHUNK_TOKENS and not breaks:
        return 1
    return tokens // (CHUNK_TOKENS - COMMA_BACKTRACK + 1) + breaks + 1


@dataclass
class Prepared:
    """What one process made of one chunk of images: their index rows, captions, and fixed prompts."""

    rows: np.ndarray
    captions: list
    prompts: list  # the fixed prompt of each image, or None
    prompt_keys: list  # each prompt's store key, or None


class Preparation:
    """Encoding a dataset's images and fixed prompts into the store, one chunk at a time."""

    def __init__(self, template, settings, encoders, store, encode_latents=True):
        self.template, self.settings, self.encoders, self.store = template, settings, encoders, store
        self.encode_latents = encode_latents
        self.present = set()  # keys of the prompt entries this process checked or wrote

    @torch.no_grad()
    def chunk(self, chunk):
        rows = np.zeros(len(chunk), dtype=INDEX_ROW)
        captions, prompts, keys = [], [], []
        for row, entry in zip(rows, chunk):
            self.image(row, entry)
            captions.append(entry.caption)
            prompt, key = self.prompt(row, entry)
            prompts.append(prompt)
            keys.append(key)
        return Prepared(rows, captions, prompts, keys)

    def image(self, row, entry):
        settings, encoders = self.settings, self.encoders
        raw = entry.read()
        original_size = image_header(raw, entry.label)
        check_size(original_size, entry.label)
        size = training_size(original_size, settings)
        generator = torch.Generator().manual_seed(sample_key(settings.seed, 1, entry.shard, entry.row))
        box = crop_box(original_size, size, settings.center_crop, generator)
        content_hash = hashlib.sha256(raw).hexdigest()
        shape = encoders.latent_shape(size)
        row["shard"], row["row"] = entry.shard, entry.row
        row["geometry"] = [*size, *original_size, box[3], box[2], box[3], box[0] - box[2] - size[0]]
        row["shape"] = (2 if settings.random_flip else 1, *shape)
        cropped = None

        def crop():
            nonlocal cropped
            if cropped is None:
                cropped = scaled_crop(to_rgb(decode_image(raw, entry.label), settings.use_weight), box, size)
            return cropped

        if self.encode_latents:
            key = latent_key(content_hash, box, size, settings, encoders)
            if self.store.read("latents", key) is None:
                variants = [crop(), crop().transpose(Image.FLIP_LEFT_RIGHT)] if settings.random_flip else [crop()]
                encoders.vae_calls += 1
                dist = encoders.vae.encode(pixel_values(variants).to(encoders.device, encoders.dtype)).latent_dist
                scaling = encoders.vae.config.scaling_factor
                latents = {"mean": dist.mean.float().cpu() * scaling, "std": dist.std.float().cpu() * scaling}
                self.store.write("latents", key, latents)
            row["latents"] = np.frombuffer(key, dtype=np.uint8)
        if settings.use_weight and self.encode_latents:
            key = entry_key("weight", content_hash, box, size, shape)
            if self.store.read("weights", key) is None:
                self.store.write("weights", key, {"weight": alpha_weight(crop(), shape)})
            row["weights"] = np.frombuffer(key, dtype=np.uint8)

    def prompt(self, row, entry):
        """The image's fixed prompt and its store key (its embedding encoded where the store lacks it), or
        (None, None) where prompts change at every use; the chunk count of its context, or their bound."""
        settings, encoder = self.settings, self.encoders.prompt_encoder
        if not settings.fixed_prompts:
            row["prompt"] = -1
            row["chunks"] = max(
                chunks_bound(make_prompt(line, entry.caption, settings.name), encoder) for line in self.template
            )
            return None, None
        generator = torch.Generator().manual_seed(sample_key(settings.seed, 7, entry.shard, entry.row))
        line = self.template[int(torch.randint(0, len(self.template), (1,), generator=generator))]
        prompt = make_prompt(line, entry.caption, settings.name)
        row["chunks"] = encoder.chunk_count(prompt)
        if not self.encode_latents:
            return prompt, None
        key = prompt_key(prompt, self.encoders)
        if key not in self.present:
            if self.store.read("prompts", key) is None:
                # Each prompt alone, as the webui encodes a caption: its embedding then depends on nothing else.
                ((embedding, pooled),) = encoder.each([prompt])
                self.encoders.prompt_calls += 1
                tensors = {"embedding": embedding.to(self.encoders.embedding_dtype).cpu()}
                if pooled is not None:
                    tensors["pooled"] = pooled.to(self.encoders.embedding_dtype).cpu()
                self.store.write("prompts", key, tensors)
            self.present.add(key)
        return prompt, key


def prepare_records(
    entries, template, settings, encoders, store_dir=None, state=None, show_progress=False, encode_latents=True
):
    """Every image's record, in the store: each process (of accelerate's `state`) encodes its chunks of CHUNK
    images (latents where the store lacks them, and fixed prompts' embeddings), and after every round the processes
    exchange the chunks' index rows, so that all build the same index, bit for bit what one process alone builds.
    An unreadable image stops every process with the same error. With encode_latents False nothing is encoded (the
    index holds the crops and prompts; training encodes at every step). Returns (records, damaged store entries
    encoded again)."""
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    rank, world_size = (0, 1) if state is None else (state.process_index, state.num_processes)
    store = RecordStore(store_dir or default_store_dir())
    if world_size > 1:
        check_shared(store, state)
    preparation = Preparation(template, settings, encoders, store, encode_latents)
    parts = []
    mine = entries.chunks(rank, world_size)
    with tqdm(
        total=None if entries.streamed else len(entries),
        desc="Encoding records",
        unit="image",
        disable=not show_progress,
    ) as progress:
        while True:
            try:
                chunk = next(mine, None)
                payload = None if chunk is None else preparation.chunk(chunk)
            except UsageError as e:
                payload = e
            payloads = [payload] if world_size == 1 else gather_object([payload])
            errors = [p for p in payloads if isinstance(p, UsageError)]
            if errors:
                raise errors[0]
            received = [p for p in payloads if p is not None]
            parts += received
            progress.update(sum(len(p.rows) for p in received))
            if not received:
                break
    damaged = store.damaged if world_size == 1 else sum(gather_object([store.damaged]))
    if not parts:
        raise UsageError("the dataset held no images")
    folder = write_index(store, parts, rank == 0 or world_size == 1)
    if world_size > 1:
        state.wait_for_everyone()
    return Records(store, folder), damaged


def write_index(store, parts, writer):
    """The index of the images in `parts` (from every process), in (shard, row) order, under a name of its content:
    index/DIGEST/ in the store. Only `writer` writes it; the name is the same in every process."""
    rows = np.concatenate([p.rows for p in parts])
    order = np.lexsort((rows["row"], rows["shard"]))
    rows = rows[order]
    flat = lambda name: [value for p in parts for value in getattr(p, name)]  # noqa: E731
    captions, prompts, keys = ([flat(name)[i] for i in order] for name in ("captions", "prompts", "prompt_keys"))
    table = {}  # each distinct prompt's row, in order of first use
    for i, prompt in enumerate(prompts):
        if prompt is not None:
            rows["prompt"][i] = table.setdefault(prompt, (len(table), keys[i]))[0]
    texts = list(table)
    prompt_keys = np.zeros((len(texts), 32), dtype=np.uint8)
    for n, key in table.values():
        if key is not None:
            prompt_keys[n] = np.frombuffer(key, dtype=np.uint8)
    digest = hashlib.sha256(INDEX_LAYOUT + rows.tobytes() + prompt_keys.tobytes())
    for text in (*captions, *texts):
        digest.update(text.encode("utf-8") + b"\0")
    folder = os.path.join(store.directory, "index", digest.hexdigest()[:32])
    if writer and not os.path.isfile(os.path.join(folder, "rows.npy")):
        staging = f"{folder}.{secrets.token_hex(4)}.tmp"
        os.makedirs(staging)
        try:
            np.save(os.path.join(staging, "prompt_keys.npy"), prompt_keys)
            write_texts(staging, "captions", captions)
            write_texts(staging, "prompts", texts)
            np.save(os.path.join(staging, "rows.npy"), rows)
            try:
                os.rename(staging, folder)
            except OSError:
                if not os.path.isfile(os.path.join(folder, "rows.npy")):  # not another run's identical index
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def check_shared(store, state):
    """Every process must see the same store: what one writes, the others read. Refused where a node has a folder
    of its own under the same path."""
    from accelerate.utils import broadcast_object_list, gather_object

    token = [secrets.token_hex(8) if state.is_main_process else None]
    marker = os.path.join(store.directory, ".shared-check")
    if state.is_main_process:
        with atomic_write(marker) as tmp, open(tmp, "w") as f:
            f.write(token[0])
    broadcast_object_list(token)
    state.wait_for_everyone()
    try:
        with open(marker) as f:
            sees = f.read() == token[0]
    except OSError:
        sees = False
    if not all(gather_object([sees])):
        raise ArgumentError(
            "store_dir",
            f"{store.directory}: not the same folder on every node (the processes do not see each other's files); "
            "give a folder on a filesystem every node mounts",
        )


class EpochBatchSampler(torch.utils.data.Sampler):
    """Full global batches of images of one size and one context length, in an order that depends only on the seed
    and the epoch; each item is (epoch, index), so batch assembly needs no other state.

    accelerate splits each global batch across the processes, so the data seen at each step is the same for any
    number of processes, and a resumed run skips exactly the batches it already trained on.
    """

    def __init__(self, sizes, batch_size, seed, chunks=None):
        keys = np.asarray(sizes).reshape(len(sizes), -1)
        if chunks is not None:
            keys = np.concatenate([keys, np.asarray(chunks).reshape(-1, 1)], axis=1)
        groups, inverse = np.unique(keys, axis=0, return_inverse=True)
        order = np.argsort(inverse.reshape(-1), kind="stable")
        bounds = np.searchsorted(inverse.reshape(-1)[order], np.arange(len(groups) + 1))
        self.groups = [order[bounds[g] : bounds[g + 1]].astype(np.int64) for g in range(len(groups))]
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.drop_last = False

    def set_epoch(self, epoch):
        self.epoch = epoch

    def batches(self):
        generator = torch.Generator().manual_seed(sample_key(self.seed, 2, self.epoch))
        batches = []
        for members in self.groups:
            order = [int(members[i]) for i in torch.randperm(len(members), generator=generator).tolist()]
            while len(order) % self.batch_size:  # fill the last batch from the same group
                order.append(int(members[int(torch.randint(0, len(members), (1,), generator=generator))]))
            batches += [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return [[(self.epoch, i) for i in batches[b]] for b in torch.randperm(len(batches), generator=generator)]

    def __iter__(self):
        return iter(self.batches())

    def __len__(self):
        return sum(math.ceil(len(m) / self.batch_size) for m in self.groups)


class TrainingSamples(torch.utils.data.Dataset):
    """Batches built from the records, in DataLoader workers: latents sampled from the stored mean and std, flips,
    loss weights, fixed prompts' embeddings, changing prompts from their templates with tags shuffled and dropped.
    Every random draw comes from a generator keyed by (seed, epoch, index), so the batches are the same for any
    number of workers. With entries (training without a store), the images' cropped pixels instead of latents."""

    def __init__(self, records, template, settings, entries=None):
        self.records, self.template, self.settings, self.entries = records, template, settings, entries

    def __len__(self):
        return len(self.records)

    def __getitem__(self, key):
        return self.__getitems__([key])

    def __getitems__(self, keys):
        settings, records = self.settings, self.records
        latents, pixels, noises, weights, prompts, embeddings, pooled, time_ids = [], [], [], [], [], [], [], []
        chunks = {int(records.rows[index]["chunks"]) for _, index in keys}
        for epoch, index in keys:
            generator = torch.Generator().manual_seed(sample_key(settings.seed, 3, epoch, index))
            flip = settings.random_flip and bool(torch.rand(1, generator=generator) < 0.5)
            if self.entries is None:
                latents.append(self.latent(epoch, index, flip, generator))
                weight = records.weight(index)
            else:
                image, weight = self.pixels(index)
                pixels.append(image.flip(-1) if flip else image)
                noises.append(self.noise(index, generator))
            if weight is not None:
                weights.append(weight.flip(-1) if flip else weight)
            geometry = records.geometry(index)
            top, left = geometry["flipped_crop_top_left" if flip else "crop_top_left"]
            time_ids.append(torch.tensor([*geometry["original_size"][::-1], top, left, *geometry["size"][::-1]]))
            found = records.embedding(index) if self.entries is None else None
            if found is not None:
                embeddings.append(found[0])
                if found[1] is not None:
                    pooled.append(found[1])
            elif int(records.rows[index]["prompt"]) >= 0:
                prompts.append(records.prompt(index))
            else:
                rng = random.Random(sample_key(settings.seed, 4, epoch, index))
                line = self.template[rng.randrange(len(self.template))]
                prompts.append(
                    make_prompt(
                        line,
                        records.captions[index],
                        settings.name,
                        rng,
                        settings.shuffle_tags,
                        settings.tag_drop_out,
                    )
                )
        batch = {
            "keys": list(keys),
            "weight": torch.stack(weights) if weights else None,
            "time_ids": torch.stack(time_ids),
            "chunks": max(chunks),
        }
        if latents:
            batch["latents"] = torch.stack(latents)
        else:
            batch["pixels"], batch["latent_noise"] = torch.stack(pixels), torch.stack(noises)
        if embeddings:
            batch["encoder_hidden_states"] = torch.stack(embeddings)
            batch["pooled_embeddings"] = torch.stack(pooled) if pooled else None
        else:
            batch["prompts"] = prompts
        return batch

    def latent(self, epoch, index, flip, generator):
        """The latent an image trains on at this use: the mean of its (or its mirror's) latent distribution plus
        its standard deviation times noise(): the mean itself ('deterministic'), a draw fixed for the image
        ('once'), or a new draw at every use ('random')."""
        means, stds = self.records.latents(index)
        mean, std = (means[-1], stds[-1]) if flip else (means[0], stds[0])
        if self.settings.latent_sampling_method == "deterministic":
            return mean
        return mean + std * self.noise(index, generator)

    def noise(self, index, generator):
        shape = tuple(int(n) for n in self.records.rows[index]["shape"][1:])
        method = self.settings.latent_sampling_method
        if method == "random":
            return torch.randn(shape, generator=generator)
        if method == "once":
            return torch.randn(
                shape, generator=torch.Generator().manual_seed(sample_key(self.settings.seed, 6, index))
            )
        return torch.zeros(shape)

    def pixels(self, index):
        """(pixels, loss weight or None) of image `index`, cropped as its record says, for encoding at every step."""
        settings, geometry = self.settings, self.records.geometry(index)
        size = geometry["size"]
        top, left = geometry["crop_top_left"]
        scale = max(size[0] / geometry["original_size"][0], size[1] / geometry["original_size"][1])
        scaled = (
            max(size[0], round(geometry["original_size"][0] * scale)),
            max(size[1], round(geometry["original_size"][1] * scale)),
        )
        entry = self.entries.entry(index)
        image = to_rgb(decode_image(entry.read(), entry.label), settings.use_weight)
        cropped = scaled_crop(image, (*scaled, left, top), size)
        shape = tuple(self.records.rows[index]["shape"][1:])
        weight = alpha_weight(cropped, shape) if settings.use_weight else None
        return pixel_values([cropped])[0], weight


def collate(batch):
    return batch
