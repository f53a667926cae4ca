"""Training data: the webui's dataset semantics, and the latent cache.

The webui's rules (modules/textual_inversion/dataset.py): images in a folder, each with an optional same-named .txt
caption, else words from the file name; prompt templates with [filewords] and [name]; tags shuffled or dropped; the
alpha channel as a loss weight; --varsize buckets; latents sampled once, deterministically or at every use.

Images are read when they are encoded and never held: what stays in memory is one small record per image (latent
mean and std, caption, loss weight). Encoding is split across processes and every record depends only on the
image's index and the settings, so the cache is the same bit for bit for any number of processes. With a cache
folder, each encoded latent is stored under a key of everything it depends on (the image's bytes, the crop, the
VAE and its dtype) with a checksum, so a later run encodes only what changed.
"""

import bisect
import hashlib
import io
import json
import logging
import math
import os
import random
import re
import sys
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

from .errors import UsageError, first_line
from .formats import atomic_write
from .memory import release_free_memory

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
LATENT_SAMPLING_METHODS = ("once", "deterministic", "random")
CACHE_FORMAT = "hypernet-latents-1"
CHUNK = 16  # images (and captions, embedded together) a process takes at a time; the same for any process count


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
    def fixed_captions(self):
        """Whether every image's prompt is the same at every use, so that its text embedding can be cached."""
        return not (self.shuffle_tags or self.tag_drop_out)


def sample_key(seed, *parts):
    """A seed for one sample's randomness, the same whatever the number of processes or where a run resumed."""
    key = seed
    for part in parts:
        key = (key * 1_000_003 + int(part)) % (1 << 62)
    return key


# -- reading images and captions ------------------------------------------------------------------------------


def read_text(path, flag=None):
    """A text file's text: UTF-8 (with or without BOM) or UTF-16 with BOM; anything else is refused by name."""
    where = f"{flag} {path}" if flag else str(path)
    try:
        if not os.path.isfile(path):
            raise UsageError(f"{where}: no such file")
        if os.path.getsize(path) > 16 << 20:
            raise UsageError(f"{where}: larger than 16 MiB, too large for a text file")
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UsageError(f"{where}: cannot be read ({e.strerror})") from None
    try:
        return raw.decode("utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"{where}: not UTF-8 or UTF-16 text; re-save it as UTF-8") from None


def read_caption(path):
    return read_text(path).strip()


def filewords_from_name(filename):
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


class Texts:
    """Strings kept as one: a str object per image costs about 50 bytes beyond its characters, which would make
    memory grow with the dataset faster than the latents do."""

    __slots__ = ("text", "ends")

    def __init__(self, strings):
        self.text = "".join(strings)
        self.ends = np.cumsum([len(s) for s in strings], dtype=np.int64)

    @classmethod
    def join(cls, parts):
        texts = cls([])
        texts.text = "".join(part.text for part in parts)
        offsets = np.cumsum([0] + [len(part.text) for part in parts[:-1]])
        texts.ends = np.concatenate([part.ends + offset for part, offset in zip(parts, offsets)])
        return texts

    def __len__(self):
        return len(self.ends)

    @property
    def nbytes(self):
        return sys.getsizeof(self.text) + self.ends.nbytes

    def __getitem__(self, index):
        return self.text[int(self.ends[index - 1]) if index else 0 : int(self.ends[index])]


@dataclass(frozen=True)
class Entry:
    """One image of a dataset as encoding needs it: read() gives its bytes; label is the name errors give it."""

    index: int
    caption: str
    label: str
    read: Callable[[], bytes]


class Entries:
    """A dataset's images and captions, each read when asked for: raw(i) gives image i's bytes, caption(i) its
    caption, label(i) the name an error message gives it."""

    streamed = False

    def __init__(self, count, read, caption, label):
        self.count, self._read, self._caption, self._label = count, read, caption, label

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

    def chunks(self, rank=0, world_size=1):
        """This process's chunks, in order: lists of the Entry of CHUNK consecutive images, every world_size-th
        chunk from the rank-th."""
        for start in range(rank * CHUNK, len(self), world_size * CHUNK):
            yield [Entry(i, self.caption(i), self.label(i), partial(self.raw, i))
                   for i in range(start, min(len(self), start + CHUNK))]  # fmt: skip


class StreamedEntries:
    """A streamed `datasets` dataset (an IterableDataset), read once, in order, as it arrives. Every process reads
    the stream; each decodes and encodes only the images of its own chunks."""

    streamed = True

    def __init__(self, dataset, name, image_column, caption_column):
        self.dataset, self.name = dataset, name
        self.image_column, self.caption_column = image_column, caption_column

    def rows(self):
        rows = iter(self.dataset)
        index = 0
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except Exception as e:  # whatever the source raises (a lost connection, a damaged shard), in one line
                reason = first_line(e) or type(e).__name__
                raise UsageError(f"--dataset_name {self.name}: reading row {index} failed ({reason})") from None
            yield row
            index += 1

    def chunks(self, rank=0, world_size=1):
        chunk = []
        for index, row in enumerate(self.rows()):
            if (index // CHUNK) % world_size != rank:
                continue
            for column in (self.image_column, self.caption_column):
                if column not in row:
                    raise UsageError(f"--dataset_name {self.name}: no column {column!r}; it has {', '.join(row)}")
            label = f"{self.name} row {index}"
            read = partial(image_bytes, row[self.image_column], label)
            chunk.append(Entry(index, str(row[self.caption_column]), label, read))
            if (index + 1) % CHUNK == 0:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


def _read_file(path):
    with open(path, "rb") as f:
        return f.read()


def image_bytes(value, label):
    """An image cell of a `datasets` dataset as file bytes: {bytes, path} when not decoded, else a PIL image."""
    if isinstance(value, dict):
        return value["bytes"] if value.get("bytes") else _read_file(value["path"])
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    raise UsageError(f"{label}: holds {type(value).__name__}, not an image; name the image column with --image_column")


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
        logger.warning(f"{data_dir}: skipped {len(skipped)} file(s) of formats the webui does not train on: "
                       f"{', '.join(sorted(skipped)[:5])}; convert them to PNG to use them")  # fmt: skip
    if not names:
        raise UsageError(f"--train_data_dir {data_dir}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    names = Texts(sorted(names))
    path = lambda index: os.path.join(data_dir, names[index])  # noqa: E731
    return Entries(len(names), lambda index: _read_file(path(index)), partial(_folder_caption, path), path)


def _folder_caption(path, index):
    image_path = path(index)
    caption_path = os.path.splitext(image_path)[0] + ".txt"
    return read_caption(caption_path) if os.path.isfile(caption_path) else filewords_from_name(image_path)


def dataset_entries(dataset_name, config_name=None, image_column="image", caption_column="text", streaming=False):
    """A `datasets` dataset (a local imagefolder, Arrow or Parquet files, or a dataset name), read lazily: images
    stay encoded in the dataset until they are needed. With `streaming`, StreamedEntries read as the data arrives."""
    import datasets

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
        raise UsageError(f"--dataset_name {dataset_name}: cannot be loaded ({reason})") from None
    for column in (image_column, caption_column):
        if dataset.column_names is not None and column not in dataset.column_names:
            raise UsageError(
                f"--dataset_name {dataset_name}: no column {column!r}; it has {', '.join(dataset.column_names)}"
            )
    if dataset.features is not None and isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    if streaming:
        return StreamedEntries(dataset, dataset_name, image_column, caption_column)
    if len(dataset) == 0:
        raise UsageError(f"--dataset_name {dataset_name}: the dataset is empty")
    images, captions = dataset.select_columns([image_column]), dataset.select_columns([caption_column])
    label = lambda index: f"{dataset_name} row {index}"  # noqa: E731
    return Entries(len(dataset), lambda index: image_bytes(images[index][image_column], label(index)),
                   lambda index: str(captions[index][caption_column]), label)  # fmt: skip


def check_images(entries, use_weight=False):
    """Open every image and caption once before any model loads, so that a bad file stops the run at once, by name."""
    for index in range(len(entries)):
        entries.caption(index)
        size = entries.image(index, use_weight).size
        if min(size) < 8:
            raise UsageError(f"{entries.label(index)}: image is {size[0]}x{size[1]}, too small to train on")


def load_template(path):
    """A template file's lines (prompts with [filewords] and [name]); no file: the caption alone."""
    if path is None:
        return ["[filewords]"]
    lines = [line.strip() for line in read_text(path, "--template_file").splitlines() if line.strip()]
    if not lines:
        raise UsageError(f"--template_file {path}: empty; put one prompt template a line")
    if not any("[filewords]" in line for line in lines):
        logger.warning(f"{path} has no [filewords]: the images' captions are not used, every prompt comes from it")
    return lines


def make_caption(template_line, filewords, name, rng=None, shuffle_tags=False, tag_drop_out=0.0):
    """The webui's create_text: tags of the caption dropped and shuffled, then put into the template."""
    tags = filewords.split(",")
    if rng is not None and tag_drop_out:
        tags = [tag for tag in tags if rng.random() > tag_drop_out]
    if rng is not None and shuffle_tags:
        rng.shuffle(tags)
    return template_line.replace("[filewords]", ",".join(tags)).replace("[name]", name)


# -- images to latents ----------------------------------------------------------------------------------------


def training_size(image, settings):
    """(width, height) an image trains at: --resolution square, or with --varsize its own size in steps of 64."""
    if settings.varsize:
        return max(64, image.width // 64 * 64), max(64, image.height // 64 * 64)
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


@dataclass(slots=True)
class Record:
    """One image, ready for training: latent means (of the image, and of its mirror with --random_flip) and, for
    'random' sampling, their standard deviations; caption; loss weight; text embedding where captions are fixed."""

    means: torch.Tensor  # (variants, channels, height, width): the image, then its mirror
    stds: torch.Tensor  # the same shape; None unless latents are sampled again at every use
    size: tuple  # (width, height) trained at
    original_size: tuple  # (width, height) of the image file
    crop_top_left: tuple  # (top, left) in the scaled image
    flipped_crop_top_left: tuple  # the same crop, measured in the mirrored scaled image
    filewords: str
    caption: str  # with its template line, when captions are fixed
    weight: torch.Tensor = None
    embedding: torch.Tensor = None
    pooled_embedding: torch.Tensor = None

    @property
    def mean(self):
        return self.means[0]

    @property
    def flipped_mean(self):
        return self.means[-1]

    @property
    def std(self):
        return None if self.stds is None else self.stds[0]

    @property
    def flipped_std(self):
        return None if self.stds is None else self.stds[-1]


class LatentCache:
    """Encoded latents on disk, one file per key, each with a checksum; written atomically, so several processes
    and runs can share the folder. A damaged entry is reported and encoded again, never used."""

    def __init__(self, directory):
        self.directory = directory
        self.corrupt = 0
        if directory:
            os.makedirs(directory, exist_ok=True)

    def path(self, key):
        return os.path.join(self.directory, key[:2], key + ".safetensors")

    def get(self, key):
        if not self.directory or not os.path.isfile(self.path(key)):
            return None
        try:
            with open(self.path(key), "rb") as f:
                raw = f.read()
            tensors = load_safetensors_bytes(raw)
            header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
            if header.get("checksum") != f"{CACHE_FORMAT}:{tensors_checksum(tensors)}":
                raise ValueError("checksum mismatch")
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
            self.corrupt += 1
            warnings.warn(f"latent cache entry {self.path(key)} is damaged ({e}); encoding it again", stacklevel=2)
            return None
        return tensors

    def put(self, key, tensors):
        if not self.directory:
            return
        metadata = {"checksum": f"{CACHE_FORMAT}:{tensors_checksum(tensors)}"}  # one key: the bytes are the same
        data = save_safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
        with atomic_write(self.path(key)) as tmp, open(tmp, "wb") as f:
            f.write(data)


def tensors_checksum(tensors):
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Encoders:
    """The frozen models data preparation uses, with what identifies their weights in cache keys."""

    vae: torch.nn.Module
    tokenizers: list
    text_encoders: list
    device: torch.device
    dtype: torch.dtype
    vae_id: str = ""
    vae_calls: int = field(default=0)


def latent_key(content_hash, box, size, settings, encoders):
    parts = [content_hash, box, size, settings.random_flip, encoders.vae_id, str(encoders.dtype)]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


@torch.no_grad()
def encode_image(entry, template, settings, encoders, cache):
    """The record of an image: its crop and template line drawn from a generator keyed by its index, its latents
    read from the cache or encoded."""
    raw = entry.read()
    image = to_rgb(decode_image(raw, entry.label), settings.use_weight)
    generator = torch.Generator().manual_seed(sample_key(settings.seed, 1, entry.index))
    size = training_size(image, settings)
    scaled_w, scaled_h, left, top = crop_box(image.size, size, settings.center_crop, generator)
    line = template[int(torch.randint(0, len(template), (1,), generator=generator))]
    key = latent_key(hashlib.sha256(raw).hexdigest(), (scaled_w, scaled_h, left, top), size, settings, encoders)
    latents = cache.get(key)
    # The scaled crop is what the VAE encodes and where the loss weight's alpha comes from; a cache hit without
    # --use_weight needs neither.
    cropped = None
    if latents is None or settings.use_weight:
        cropped = image.resize((scaled_w, scaled_h), Image.BICUBIC).crop((left, top, left + size[0], top + size[1]))
    if latents is None:
        variants = [cropped, cropped.transpose(Image.FLIP_LEFT_RIGHT)] if settings.random_flip else [cropped]
        pixels = torch.stack([torch.from_numpy(np.asarray(v.convert("RGB"), dtype=np.float32)) for v in variants])
        pixels = (pixels / 127.5 - 1.0).permute(0, 3, 1, 2).to(encoders.device, encoders.dtype)
        encoders.vae_calls += 1
        dist = encoders.vae.encode(pixels).latent_dist
        scaling = encoders.vae.config.scaling_factor
        latents = {"mean": dist.mean.float().cpu() * scaling, "std": dist.std.float().cpu() * scaling}
        cache.put(key, latents)
    mean, std = latents["mean"], latents["std"]
    once = mean + std * torch.randn(mean.shape, generator=generator)  # drawn whatever the method, so keys stay aligned
    if settings.latent_sampling_method == "once":
        mean = once
    if settings.latent_sampling_method != "random":
        std = None  # only 'random' samples again at every use
    return Record(
        means=mean,
        stds=std,
        size=size,
        original_size=image.size,
        crop_top_left=(top, left),
        flipped_crop_top_left=(top, scaled_w - left - size[0]),
        filewords=entry.caption,
        caption=make_caption(line, entry.caption, settings.name),
        weight=alpha_weight(cropped, mean.shape[1:]) if settings.use_weight else None,
    )


def tokenize(prompts, tokenizers):
    """Token ids of each tokenizer, padded to its length, as diffusers' pipelines tokenize."""
    return [
        tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        for tokenizer in tokenizers
    ]


def encode_tokens(input_ids, text_encoders):
    """(embeddings, pooled embeddings or None): SD 1.x/2.x the text encoder's last hidden state; SDXL, as its
    pipeline does, both encoders' penultimate hidden states side by side and the second one's pooled output."""
    if len(text_encoders) == 1:
        (encoder,) = text_encoders
        return encoder(input_ids[0].to(encoder.device))[0], None
    states, pooled = [], None
    for ids, encoder in zip(input_ids, text_encoders):
        output = encoder(ids.to(encoder.device), output_hidden_states=True)
        states.append(output.hidden_states[-2])
        pooled = output[0]
    return torch.cat(states, dim=-1), pooled


GEOMETRY = ("size", "original_size", "crop_top_left", "flipped_crop_top_left")  # pairs of ints, one row an image
MERGE = 8  # chunks Records merges into one StackedRecords as they arrive


@dataclass(eq=False)
class StackedRecords:
    """The records of consecutive images, each kind of tensor stacked into one: a tensor, an array or a str per image
    would cost more memory than its latents."""

    start: int  # the first image's index
    groups: list  # one per latent shape: {"means": tensor, "stds": tensor or None, "weights": tensor or None}
    slots: np.ndarray  # (images, 2): each image's group and row in it
    geometry: np.ndarray  # (images, 8): the pairs of GEOMETRY
    filewords: Texts
    captions: Texts
    embeddings: torch.Tensor = None
    pooled_embeddings: torch.Tensor = None

    @classmethod
    def stack(cls, start, records):
        shapes = list(dict.fromkeys(tuple(r.means.shape) for r in records))
        members = [[i for i, r in enumerate(records) if tuple(r.means.shape) == shape] for shape in shapes]
        groups = [
            {
                key: None
                if getattr(records[rows[0]], name) is None
                else torch.stack([getattr(records[i], name) for i in rows])
                for key, name in (("means", "means"), ("stds", "stds"), ("weights", "weight"))
            }  # fmt: skip
            for rows in members
        ]
        slots = np.zeros((len(records), 2), dtype=np.int32)
        for group, rows in enumerate(members):
            slots[rows, 0], slots[rows, 1] = group, np.arange(len(rows))
        geometry = np.array([[v for name in GEOMETRY for v in getattr(r, name)] for r in records], dtype=np.int32)
        return cls(start, groups, slots, geometry, Texts([r.filewords for r in records]),
                   Texts([r.caption for r in records]))  # fmt: skip

    @classmethod
    def concatenate(cls, stacks):
        """One StackedRecords of consecutive ones: groups of the same shape joined."""
        shapes, members, slots = {}, {}, []
        for stack in stacks:
            mapping = []  # each of its groups' new group and first row there
            for group in stack.groups:
                shape = tuple(group["means"].shape[1:])
                joined = members.setdefault(shapes.setdefault(shape, len(shapes)), [])
                mapping.append((shapes[shape], sum(len(g["means"]) for g in joined)))
                joined.append(group)
            mapping = np.array(mapping, dtype=np.int32)[stack.slots[:, 0]]
            slots.append(np.stack([mapping[:, 0], mapping[:, 1] + stack.slots[:, 1]], axis=1))
        groups = [
            {key: None if joined[0][key] is None else torch.cat([g[key] for g in joined]) for key in joined[0]}
            for joined in members.values()
        ]
        cat = lambda name: None if getattr(stacks[0], name) is None else torch.cat([getattr(s, name) for s in stacks])  # noqa: E731
        return cls(stacks[0].start, groups, np.concatenate(slots), np.concatenate([s.geometry for s in stacks]),
                   Texts.join([s.filewords for s in stacks]), Texts.join([s.captions for s in stacks]),
                   cat("embeddings"), cat("pooled_embeddings"))  # fmt: skip

    def __len__(self):
        return len(self.slots)

    def record(self, row):
        group = self.groups[self.slots[row, 0]]
        position = int(self.slots[row, 1])
        pick = lambda tensor: None if tensor is None else tensor[position]  # noqa: E731
        pairs = self.geometry[row].tolist()
        return Record(
            means=group["means"][position],
            stds=pick(group["stds"]),
            **{name: tuple(pairs[2 * n : 2 * n + 2]) for n, name in enumerate(GEOMETRY)},
            filewords=self.filewords[row],
            caption=self.captions[row],
            weight=pick(group["weights"]),
            embedding=None if self.embeddings is None else self.embeddings[row],
            pooled_embedding=None if self.pooled_embeddings is None else self.pooled_embeddings[row],
        )

    @property
    def nbytes(self):
        arrays = self.slots.nbytes + self.geometry.nbytes + self.filewords.nbytes + self.captions.nbytes
        return arrays + sum(t.untyped_storage().nbytes() for t in self.tensors())

    def tensors(self):
        found = [t for g in self.groups for t in g.values()]
        return [t for t in (*found, self.embeddings, self.pooled_embeddings) if t is not None]

    def converted(self, convert):
        """The same records with every tensor passed through `convert`."""
        optional = lambda t: None if t is None else convert(t)  # noqa: E731
        groups = [{key: optional(value) for key, value in group.items()} for group in self.groups]
        return StackedRecords(self.start, groups, self.slots, self.geometry, self.filewords, self.captions,
                              optional(self.embeddings), optional(self.pooled_embeddings))  # fmt: skip


class Records:
    """Every image's record, in order: records[i] is image i's Record (its tensors views into stacked ones)."""

    def __init__(self):
        self.stacks, self.starts = [], []
        self.count = 0
        self._unmerged = 0

    def append(self, stack):
        if stack.start != self.count:
            raise ValueError(f"records of image {stack.start} appended after {self.count} images")
        self.stacks.append(stack)
        self.starts.append(stack.start)
        self.count += len(stack)
        self._unmerged += 1
        if self._unmerged == MERGE:
            merged = StackedRecords.concatenate(self.stacks[-MERGE:])
            del self.stacks[-MERGE:], self.starts[-MERGE:]
            self.stacks.append(merged)
            self.starts.append(merged.start)
            self._unmerged = 0

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        if not -self.count <= index < self.count:
            raise IndexError(f"image {index} of {self.count}")
        index %= self.count
        n = bisect.bisect_right(self.starts, index) - 1
        return self.stacks[n].record(index - self.starts[n])

    def sizes(self):
        """Each image's (width, height) as trained."""
        return [tuple(pair) for stack in self.stacks for pair in stack.geometry[:, :2].tolist()]

    @property
    def nbytes(self):
        """The memory the records take: tensors (latents, loss weights, text embeddings), per-image arrays, captions."""
        return sum(stack.nbytes for stack in self.stacks)


@torch.no_grad()
def encode_chunk(chunk, template, settings, encoders, cache):
    """The StackedRecords of a chunk (a list of Entry): latents, and with fixed captions the text embeddings, the
    chunk's captions encoded together."""
    records = [encode_image(entry, template, settings, encoders, cache) for entry in chunk]
    result = StackedRecords.stack(chunk[0].index, records)
    if settings.fixed_captions:
        embeddings, pooled = encode_tokens(tokenize([r.caption for r in records], encoders.tokenizers),
                                           encoders.text_encoders)  # fmt: skip
        result.embeddings = embeddings.cpu()
        result.pooled_embeddings = None if pooled is None else pooled.cpu()
    return result


def prepare_records(entries, template, settings, encoders, cache_dir=None, state=None, show_progress=False):
    """Every image's record: each process (of accelerate's `state`) encodes its chunks, CHUNK images at a time, and
    after every round of chunks the processes exchange theirs, so that all hold the same Records, bit for bit what
    one process alone makes, and nothing but the records and one round stay in memory. An unreadable image stops
    every process with the same error. Returns (records, damaged cache entries encoded again)."""
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    rank, world_size = (0, 1) if state is None else (state.process_index, state.num_processes)
    cache = LatentCache(cache_dir)
    records = Records()
    mine = entries.chunks(rank, world_size)
    with tqdm(total=None if entries.streamed else len(entries), desc="Caching latents", disable=not show_progress,
              unit="image") as progress:  # fmt: skip
        while True:
            try:
                chunk = next(mine, None)
                payload = None if chunk is None else encode_chunk(chunk, template, settings, encoders, cache)
            except UsageError as e:
                payload = str(e)
            payloads = [payload] if world_size == 1 else exchange(payload)
            errors = [p for p in payloads if isinstance(p, str)]
            if errors:
                raise UsageError(errors[0])
            for received in payloads:
                if received is not None:
                    records.append(received)
                    progress.update(len(received))
            # The records stay; what encoding freed around them goes back to the system, so that memory grows with
            # the records and not with the holes between them.
            release_free_memory()
            # Chunks are dealt in turn: once a process has none left, this round was the last.
            if any(p is None for p in payloads):
                break
    corrupt = cache.corrupt if world_size == 1 else sum(gather_object([cache.corrupt]))
    return records, corrupt


def exchange(payload):
    """Every process's payload (StackedRecords, an error message or None), in process order. Records travel as numpy
    arrays: pickling a tensor writes a torch.save archive of its storage, many times slower than the array itself."""
    from accelerate.utils import gather_object

    is_stack = lambda p: isinstance(p, StackedRecords)  # noqa: E731
    payloads = gather_object([payload.converted(lambda t: t.numpy()) if is_stack(payload) else payload])
    return [p.converted(torch.from_numpy) if is_stack(p) else p for p in payloads]


class EpochBatchSampler(torch.utils.data.Sampler):
    """Full global batches of equal-sized images, in an order that depends only on the seed and the epoch; each item
    is (epoch, index), so batch assembly needs no other state.

    accelerate splits each global batch across the processes, so the data seen at each step is the same for any
    number of processes, and a resumed run skips exactly the batches it already trained on.
    """

    def __init__(self, sizes, batch_size, seed):
        self.groups = {}
        for index, size in enumerate(sizes):
            self.groups.setdefault(tuple(size), []).append(index)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.drop_last = False

    def set_epoch(self, epoch):
        self.epoch = epoch

    def batches(self):
        generator = torch.Generator().manual_seed(sample_key(self.seed, 2, self.epoch))
        batches = []
        for size in sorted(self.groups):
            members = self.groups[size]
            order = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
            while len(order) % self.batch_size:  # fill the last batch from the same size group
                order.append(members[int(torch.randint(0, len(members), (1,), generator=generator))])
            batches += [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        return [[(self.epoch, i) for i in batches[b]] for b in torch.randperm(len(batches), generator=generator)]

    def __iter__(self):
        return iter(self.batches())

    def __len__(self):
        return sum(math.ceil(len(m) / self.batch_size) for m in self.groups.values())


class TrainingSamples(torch.utils.data.Dataset):
    """Batches built from the records, in DataLoader workers: latents sampled from the cached mean and std, flips,
    loss weights, captions from their templates with tags shuffled and dropped, token ids. Every random draw comes
    from a generator keyed by (seed, epoch, index), so the batches are the same for any number of workers."""

    def __init__(self, records, template, settings, tokenizers):
        self.records, self.template, self.settings, self.tokenizers = records, template, settings, tokenizers

    def __len__(self):
        return len(self.records)

    def __getitem__(self, key):
        return self.__getitems__([key])

    def __getitems__(self, keys):
        settings = self.settings
        latents, weights, captions, embeddings, pooled, time_ids = [], [], [], [], [], []
        for epoch, index in keys:
            record = self.records[index]
            generator = torch.Generator().manual_seed(sample_key(settings.seed, 3, epoch, index))
            flip = settings.random_flip and bool(torch.rand(1, generator=generator) < 0.5)
            mean = record.flipped_mean if flip else record.mean
            std = record.flipped_std if flip else record.std
            if settings.latent_sampling_method == "random":
                mean = mean + std * torch.randn(mean.shape, generator=generator)
            latents.append(mean)
            if record.weight is not None:
                weights.append(record.weight.flip(-1) if flip else record.weight)
            top, left = record.flipped_crop_top_left if flip else record.crop_top_left
            time_ids.append(torch.tensor([*record.original_size[::-1], top, left, *record.size[::-1]]))
            if record.embedding is not None:
                embeddings.append(record.embedding)
                if record.pooled_embedding is not None:
                    pooled.append(record.pooled_embedding)
            else:
                rng = random.Random(sample_key(settings.seed, 4, epoch, index))
                line = self.template[rng.randrange(len(self.template))]
                captions.append(make_caption(line, record.filewords, settings.name, rng, settings.shuffle_tags,
                                             settings.tag_drop_out))  # fmt: skip
        batch = {
            "keys": list(keys),
            "latents": torch.stack(latents),
            "weight": torch.stack(weights) if weights else None,
            "time_ids": torch.stack(time_ids),
        }
        if embeddings:
            batch["encoder_hidden_states"] = torch.stack(embeddings)
            batch["pooled_embeddings"] = torch.stack(pooled) if pooled else None
        else:
            batch["captions"] = captions
            batch["input_ids"] = tokenize(captions, self.tokenizers)
        return batch


def collate(batch):
    return batch
