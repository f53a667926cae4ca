"""Where training images and their captions come from: a folder in the webui's layout, or a `datasets` dataset
(map-style or streamed); prompt templates, as the webui reads them and fills them in."""

import io
import itertools
import logging
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from PIL import Image, ImageOps

from ..errors import ArgumentError, UsageError, first_line
from .geometry import to_rgb
from .settings import sample_key

logger = logging.getLogger(__name__)

# Files with these suffixes are images: one that cannot be read stops the run. A file of any other suffix trains
# where PIL reads it (as the webui trains on every file PIL opens: .gif, .tiff, ...) and is passed over otherwise.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CHUNK = 16  # images a process takes at a time; the same for any process count


def read_text(path, argument=None):
    """A text file's text: UTF-8 (with or without BOM) or UTF-16 with BOM; anything else is refused by name, as an
    ArgumentError about `argument` where the path is a function's argument of that name."""
    error = partial(ArgumentError, argument) if argument else UsageError
    try:
        if os.path.isdir(path):
            raise error(f"{path}: a folder, not a text file")
        if os.path.exists(path) and not os.path.isfile(path):
            raise error(f"{path}: not a regular file (a device or a pipe?); give a text file")
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

    def image(self, index):
        return to_rgb(decode_image(self.raw(index), self.label(index)))

    def source(self, index):
        return self.raw(index) if self._path is None else self._path(index)

    def entry(self, index):
        return Entry(0, index, self.caption(index), self.label(index), partial(self.raw, index))

    def spread(self, limit):
        """(RGB image, caption) of up to `limit` images spread evenly over the dataset."""
        count = min(len(self), limit)
        for index in sorted({i * len(self) // count for i in range(count)}):
            yield self.image(index), self.caption(index)

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
                    caption_text(row[self.caption_column], label, self.caption_column),
                    label,
                    partial(image_bytes, row[self.image_column], label, self.image_column),
                )
            )
            if len(chunk) == CHUNK:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def spread(self, limit):
        """(RGB image, caption) of the stream's first `limit` images: a stream is read in order, once."""
        entries = (entry for chunk in self.chunks() for entry in chunk)
        for entry in itertools.islice(entries, limit):
            yield to_rgb(decode_image(entry.read(), entry.label)), entry.caption

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


def caption_text(value, label, column):
    """A caption cell of a `datasets` dataset: text, never a list, a number or null read as its spelling."""
    if not isinstance(value, str):
        shown = "null" if value is None else f"{type(value).__name__} {str(value)[:40]}"
        raise ArgumentError("caption_column", f"{column!r}: {label} holds {shown} there, not text")
    return value


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
    """A folder in the webui's layout: every image, its .txt caption, else the words of its file name. As in the
    webui, every file PIL opens is an image (.gif and .tiff too); hidden files and .txt captions are not."""
    names = []
    with os.scandir(data_dir) as found:
        for item in found:
            if item.name.startswith(".") or not item.is_file():
                continue
            suffix = os.path.splitext(item.name)[1].lower()
            if suffix in IMAGE_EXTENSIONS or (suffix != ".txt" and opens_as_image(item.path)):
                names.append(item.name)
    if not names:
        raise ArgumentError("data_dir", f"{data_dir}: no images found (no file that PIL reads as an image)")
    names = sorted(names)
    path = lambda index: os.path.join(data_dir, names[index])  # noqa: E731
    return Entries(len(names), lambda index: _read_file(path(index)), partial(_folder_caption, path), path, path)


def opens_as_image(path):
    """Whether PIL identifies the file as an image from its header, as the webui's Image.open does."""
    try:
        with Image.open(path):
            return True
    except Image.DecompressionBombError:
        return True  # an image, too large: check_images refuses it by name
    except Exception:  # whatever PIL raises for a file that is not an image it reads
        return False


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
        lambda index: caption_text(captions[index][caption_column], label(index), caption_column),
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
    """A template file's lines as the webui reads them: every line, stripped, blank ones and repeats included (a
    line twice in the file is drawn twice as often); no file: the caption alone."""
    if path is None:
        return ["[filewords]"]
    text = read_text(path, "path")
    lines = [line.strip() for line in io.StringIO(text, newline=None).readlines()]
    if not any(lines):
        raise ArgumentError("path", f"{path}: empty; put one prompt template a line")
    if not any("[filewords]" in line for line in lines):
        logger.warning(f"{path} has no [filewords]: the images' captions are not used, every prompt comes from it")
    return lines


def fixed_prompt(template, caption, settings, shard, row):
    """The prompt image (shard, row) trains on at every use, where prompts are fixed: a template line drawn once for
    the image, as the webui draws it when it prepares the dataset."""
    generator = torch.Generator().manual_seed(sample_key(settings.seed, 7, shard, row))
    line = template[int(torch.randint(0, len(template), (1,), generator=generator))]
    return make_prompt(line, caption, settings.name)


def changing_prompt(template, caption, settings, epoch, index):
    """The prompt image `index` trains on at one use of `epoch`, where tags are shuffled or dropped: a template line
    and the tags drawn anew at every use, as the webui draws them."""
    rng = random.Random(sample_key(settings.seed, 4, epoch, index))
    line = template[rng.randrange(len(template))]
    return make_prompt(line, caption, settings.name, rng, settings.shuffle_tags, settings.tag_drop_out)


def make_prompt(template_line, caption, name, rng=None, shuffle_tags=False, tag_drop_out=0.0):
    """The webui's create_text: tags of the caption dropped and shuffled, then put into the template."""
    tags = caption.split(",")
    if rng is not None and tag_drop_out:
        tags = [tag for tag in tags if rng.random() > tag_drop_out]
    if rng is not None and shuffle_tags:
        rng.shuffle(tags)
    return template_line.replace("[filewords]", ",".join(tags)).replace("[name]", name)
