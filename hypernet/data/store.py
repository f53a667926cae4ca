"""The record store: what training reads. Each image's latents (mean and std, of the image and of its mirror) in a
file under a key of everything they depend on (the image's bytes, its placement, the VAE and its dtype), each
distinct fixed prompt's text embedding in a file under a key of the prompt and the text encoders, and an index of the
dataset (per image: its entries, placement and captions) that every process maps into memory. Batches read their
entries when they are built, so a process's memory does not grow with the dataset, and the processes of a node share
one copy of the store in the page cache. Encoding is split across processes and every entry depends only on its
image or prompt and the settings, so the store and its index are the same bit for bit for any number of processes,
and a later run, or a resume, encodes only what changed.
"""

import hashlib
import json
import os
import secrets
import shutil
import warnings
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from ..errors import UsageError
from ..files import atomic_write, check_writable_folder
from ..hashing import hash_cache_path
from ..processes import check_shared_folder
from ..prompts import CHUNK_TOKENS, COMMA_BACKTRACK, PromptEncoder
from .geometry import Placement, alpha_channel, alpha_weight, image_placement, pixel_values, placed_pixels, to_rgb
from .sources import check_size, decode_image, fixed_prompt, image_header, make_prompt

STORE_FORMAT = "hypernet-latents-1"  # the checksum's prefix in every store entry
PIXELS_VERSION = 2  # in latent and weight keys: how pixels and weights are made (2: alpha dropped before resizing)


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
        ("geometry", "<i4", 10),  # the pairs of GEOMETRY
        ("shape", "<i4", 4),  # of its latents entry's tensors: (variants, channels, height, width)
    ]
)
# Pairs: size (width, height) trained at, the image's own, the (top, left) of the crop in the scaled image and in its
# mirror, and the scaled image's (width, height).
GEOMETRY = ("size", "original_size", "crop_top_left", "flipped_crop_top_left", "scaled_size")
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
    scaled_size: tuple  # (width, height) the image was scaled to before the crop
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

    def placement(self, index):
        """How image `index` was scaled and cut (a geometry.Placement)."""
        geometry = self.geometry(index)
        top, left = geometry["crop_top_left"]
        return Placement(geometry["original_size"], geometry["scaled_size"], left, top, geometry["size"])

    def sizes(self):
        """Each image's (width, height) as trained, an array (images, 2)."""
        return np.asarray(self.rows["geometry"][:, :2])

    def original_sizes(self):
        """Each image's own (width, height), an array (images, 2)."""
        return np.asarray(self.rows["geometry"][:, 2:4])

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
        return latent_shape(self.vae.config, size)


def latent_shape(vae_config, size):
    """(channels, height, width) of the latents a VAE with `vae_config` (its latent_channels and block_out_channels,
    as attributes) makes of an image of `size` (width, height): 1/2 a side per block after the first."""
    factor = 2 ** (len(vae_config.block_out_channels) - 1)
    return vae_config.latent_channels, size[1] // factor, size[0] // factor


def latent_key(content_hash, placement, settings, encoders):
    parts = [content_hash, PIXELS_VERSION, placement.as_tuple(), settings.random_flip, encoders.vae_id]
    return entry_key(*parts, str(encoders.dtype))


def prompt_key(prompt, encoders):
    encoder = encoders.prompt_encoder
    parts = ["prompt", prompt, encoders.text_id, encoder.encoding, encoder.clip_skip, str(encoders.embedding_dtype)]
    if encoder.sdxl_clip_l_skip:
        parts.append("sdxl_clip_l_skip")
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
        try:
            placement = image_placement(original_size, settings, entry.shard, entry.row)
        except UsageError as e:
            raise UsageError(f"{entry.label}: {e}") from None
        size, scaled, left, top = placement.size, placement.scaled, placement.left, placement.top
        content_hash = hashlib.sha256(raw).hexdigest()
        shape = encoders.latent_shape(size)
        row["shard"], row["row"] = entry.shard, entry.row
        row["geometry"] = [*size, *original_size, top, left, top, scaled[0] - left - size[0], *scaled]
        row["shape"] = (2 if settings.random_flip else 1, *shape)
        if not self.encode_latents:
            return
        decoded = None

        def image():
            nonlocal decoded
            if decoded is None:
                decoded = decode_image(raw, entry.label)
            return decoded

        key = latent_key(content_hash, placement, settings, encoders)
        if self.store.read("latents", key) is None:
            pixels = placed_pixels(to_rgb(image()), placement)
            variants = [pixels, pixels.transpose(Image.FLIP_LEFT_RIGHT)] if settings.random_flip else [pixels]
            encoders.vae_calls += 1
            dist = encoders.vae.encode(pixel_values(variants).to(encoders.device, encoders.dtype)).latent_dist
            scaling = encoders.vae.config.scaling_factor
            latents = {"mean": dist.mean.float().cpu() * scaling, "std": dist.std.float().cpu() * scaling}
            self.store.write("latents", key, latents)
        row["latents"] = np.frombuffer(key, dtype=np.uint8)
        if settings.use_weight:
            key = entry_key("weight", content_hash, PIXELS_VERSION, placement.as_tuple(), shape)
            if self.store.read("weights", key) is None:
                self.store.write("weights", key, {"weight": alpha_weight(alpha_channel(image()), placement, shape)})
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
        prompt = fixed_prompt(self.template, entry.caption, settings, entry.shard, entry.row)
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
        check_shared_folder(state, store.directory, "store_dir")
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
