#!/usr/bin/env python
"""Train an AUTOMATIC1111-style hypernetwork on a frozen Stable Diffusion model, with accelerate.

    accelerate launch train_hypernetwork.py \\
        --pretrained_model_name_or_path MODEL --train_data_dir DATA --output_dir OUT --max_train_steps 2000

Only the hypernetwork trains; UNet, text encoder and VAE stay frozen. See README.md for the full guide.
"""

import argparse
import csv
import inspect
import io
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from collections import deque

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps

import hypernet
from hypernet.errors import HypernetError, UsageError, run_script
from hypernet.formats import atomic_write, base_model_hash
from hypernet.images import infotext, save_png
from hypernet.memory import retain_freed_memory
from hypernet.module import ACTIVATIONS, WEIGHT_INITS

logger = logging.getLogger("train_hypernetwork")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="Train an AUTOMATIC1111-style hypernetwork with accelerate.")
    model = parser.add_argument_group("model")
    model.add_argument(
        "--pretrained_model_name_or_path",
        required=True,
        help="Local diffusers folder (or hub id, when online) of a Stable Diffusion 1.x/2.x model.",
    )
    model.add_argument("--revision", default=None, help="Model revision to load (hub models only).")
    model.add_argument("--variant", default=None, help="Model file variant to load, e.g. fp16.")

    hn = parser.add_argument_group("hypernetwork")
    hn.add_argument(
        "--hypernetwork_name", default=None, help="Name of the hypernetwork ([name] in templates, file names). "
        "Default: the name of --output_dir."
    )  # fmt: skip
    hn.add_argument(
        "--resume_hypernetwork",
        default=None,
        help="Continue training this .pt/.safetensors file: its step carries on, and its optimizer state when its "
        ".optim companion's hash matches.",
    )
    hn.add_argument("--layer_structure", default="1,2,1", help="Layer widths as multiples of the attention width.")
    hn.add_argument(
        "--activation_func",
        default="linear",
        help=f"Activation after each hidden layer: {', '.join(['linear', 'relu', 'leakyrelu', 'elu', 'swish', 'tanh', 'sigmoid'])}, "
        "or any torch.nn activation by its lower-case name.",
    )
    hn.add_argument("--weight_init", default="Normal", choices=WEIGHT_INITS, help="Weight initialization.")
    hn.add_argument("--add_layer_norm", action="store_true", help="Add LayerNorm after each layer.")
    hn.add_argument("--use_dropout", action="store_true", help="Use dropout (A1111's default structure: 0.3).")
    hn.add_argument(
        "--dropout_structure",
        default=None,
        help="Dropout probability after each layer, one per --layer_structure entry, e.g. 0,0.1,0 (implies dropout).",
    )
    hn.add_argument("--activate_output", action="store_true", help="Also apply the activation after the last layer.")
    hn.add_argument(
        "--enable_sizes",
        default="auto",
        help="Attention widths to create modules for, e.g. 768,320,640,1280; 'auto' = the loaded model's widths.",
    )

    data = parser.add_argument_group("data")
    data.add_argument(
        "--train_data_dir",
        default=None,
        help="Folder of images in A1111's layout: optional same-named .txt captions, else words from the file name.",
    )
    data.add_argument(
        "--dataset_name",
        default=None,
        help="A datasets dataset name, or a local imagefolder (images + metadata.jsonl), instead of --train_data_dir.",
    )
    data.add_argument("--dataset_config_name", default=None, help="Config name of --dataset_name.")
    data.add_argument("--image_column", default="image", help="Image column of --dataset_name.")
    data.add_argument("--caption_column", default="text", help="Caption column of --dataset_name.")
    data.add_argument(
        "--template_file",
        default=None,
        help="Prompt template file, one template a line, with [filewords] (the caption) and [name]. Default: the "
        "caption alone. A1111's standard sets are in examples/templates/.",
    )
    data.add_argument("--shuffle_tags", action="store_true", help="Shuffle the comma-separated tags of each caption.")
    data.add_argument("--tag_drop_out", type=float, default=0.0, help="Drop each caption tag with this probability.")
    data.add_argument(
        "--use_weight", action="store_true", help="Use each image's alpha channel as a per-pixel loss weight."
    )
    data.add_argument("--resolution", type=int, default=512, help="Training resolution (square) in pixels.")
    data.add_argument(
        "--center_crop", action="store_true", help="Center crop to --resolution; default: a random crop."
    )
    data.add_argument("--random_flip", action="store_true", help="Randomly mirror images horizontally.")
    data.add_argument(
        "--varsize",
        action="store_true",
        help="Keep each image's own size, rounded down to multiples of 64, and batch images of equal size.",
    )
    data.add_argument(
        "--latent_sampling_method",
        default="once",
        choices=["once", "deterministic", "random"],
        help="Latents are encoded once and cached: 'once' samples them once, 'deterministic' uses the mean, "
        "'random' resamples from the cached mean and std at every use.",
    )

    training = parser.add_argument_group("training")
    training.add_argument("--output_dir", required=True, help="Where every file of the run is written.")
    training.add_argument("--seed", type=int, default=0, help="Seed for weights, data order, noise and timesteps.")
    training.add_argument("--train_batch_size", type=int, default=1, help="Batch size per process.")
    training.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="Micro-batches accumulated per optimizer step."
    )
    training.add_argument(
        "--max_train_steps",
        type=int,
        default=1000,
        help="Train until the hypernetwork's step reaches this (counted like A1111, from the resumed file's step).",
    )
    training.add_argument(
        "--learning_rate",
        default="5e-6",
        help="A rate, or an A1111 schedule such as '5e-5:100, 5e-6:1500, 5e-7' (rate until step; last to the end).",
    )
    training.add_argument(
        "--lr_scheduler",
        default="constant",
        help="diffusers scheduler for a plain --learning_rate: constant, constant_with_warmup, linear, cosine, ...",
    )
    training.add_argument("--lr_warmup_steps", type=int, default=0, help="Warmup steps of --lr_scheduler.")
    training.add_argument(
        "--optimizer", default="AdamW", help="Optimizer: any torch.optim class by name (A1111 allows these)."
    )
    training.add_argument("--use_8bit_adam", action="store_true", help="Use bitsandbytes' AdamW8bit.")
    training.add_argument("--adam_beta1", type=float, default=0.9, help="Adam beta1.")
    training.add_argument("--adam_beta2", type=float, default=0.999, help="Adam beta2.")
    training.add_argument("--adam_weight_decay", type=float, default=1e-2, help="Adam weight decay.")
    training.add_argument("--adam_epsilon", type=float, default=1e-8, help="Adam epsilon.")
    training.add_argument(
        "--clip_grad_mode", default=None, choices=["value", "norm"], help="Clip gradients by value or by norm."
    )
    training.add_argument(
        "--clip_grad_value", default="0.1", help="Clipping threshold; may be an A1111 schedule string."
    )
    training.add_argument(
        "--mixed_precision",
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Mixed precision; default: accelerate's config. The hypernetwork's weights stay float32.",
    )
    training.add_argument(
        "--gradient_checkpointing", action="store_true", help="Trade compute for memory in the frozen UNet."
    )
    training.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs.")
    training.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR loss weighting gamma (5 is usual).")
    training.add_argument("--noise_offset", type=float, default=0.0, help="Noise offset, as in diffusers' scripts.")
    training.add_argument(
        "--max_bad_steps",
        type=int,
        default=10,
        help="Stop after this many non-finite losses in a row (each such step is skipped).",
    )
    training.add_argument(
        "--dataloader_num_workers", type=int, default=0, help="DataLoader workers (the data is cached in memory)."
    )

    outputs = parser.add_argument_group("outputs")
    outputs.add_argument(
        "--save_every",
        type=int,
        default=500,
        help="Write hypernetworks/NAME-STEP.pt (+ .optim) every N steps; 0 = off.",
    )
    outputs.add_argument("--save_safetensors", action="store_true", help="Also write NAME.safetensors at the end.")
    outputs.add_argument(
        "--checkpointing_steps", type=int, default=500, help="Save an accelerate checkpoint every N steps; 0 = off."
    )
    outputs.add_argument(
        "--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints."
    )
    outputs.add_argument(
        "--resume_from_checkpoint", default=None, help="'latest' or a checkpoint-STEP folder to continue exactly."
    )
    outputs.add_argument(
        "--preview_every", type=int, default=500, help="Write images/NAME-STEP.png previews every N steps; 0 = off."
    )
    outputs.add_argument(
        "--preview_prompt", action="append", default=None, help="Preview prompt; repeat the flag for several."
    )
    outputs.add_argument("--preview_negative_prompt", default="", help="Negative prompt of the previews.")
    outputs.add_argument("--preview_seed", type=int, default=0, help="Seed of the previews.")
    outputs.add_argument("--preview_steps", type=int, default=20, help="Denoising steps of the previews.")
    outputs.add_argument("--preview_guidance_scale", type=float, default=7.0, help="CFG scale of the previews.")
    outputs.add_argument("--preview_width", type=int, default=None, help="Preview width (default: --resolution).")
    outputs.add_argument("--preview_height", type=int, default=None, help="Preview height (default: --resolution).")
    outputs.add_argument(
        "--report_to", default="none", choices=["none", "tensorboard", "wandb", "all"], help="Where to log."
    )
    outputs.add_argument("--tracker_project_name", default="hypernet", help="Tracker project name.")
    outputs.add_argument("--run_name", default=None, help="Tracker run name (default: the hypernetwork name).")
    outputs.add_argument("--logging_dir", default="logs", help="TensorBoard folder, relative to --output_dir.")

    args = parser.parse_args(input_args)
    validate_args(args)
    return args


def parse_floats(text, flag):
    try:
        return [float(x) if "." in x or "e" in x.lower() else int(x) for x in (p.strip() for p in text.split(","))]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated numbers such as 1,2,1") from None


def parse_schedule(text, flag):
    """A1111's schedule syntax: 'rate:until_step, rate:until_step, rate' -> [(rate, until_step or None)]."""
    pieces = []
    try:
        for piece in str(text).split(","):
            if not piece.strip():
                continue
            rate, _, until = piece.partition(":")
            pieces.append((float(rate), int(until) if until.strip() else None))
    except ValueError:
        raise UsageError(
            f"{flag} {text!r}: expected a number or a schedule such as '5e-5:100, 5e-6:1500, 5e-7'"
        ) from None
    if not pieces:
        raise UsageError(f"{flag} is empty")
    return pieces


def rate_at(schedule, step):
    for rate, until in schedule:
        if until is None or until < 0 or step < until:
            return rate
    return schedule[-1][0]


def validate_args(args):
    if (args.train_data_dir is None) == (args.dataset_name is None):
        raise UsageError("give exactly one of --train_data_dir and --dataset_name")
    if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
        raise UsageError(f"--train_data_dir {args.train_data_dir}: no such folder")
    if args.template_file is not None and not os.path.isfile(args.template_file):
        raise UsageError(
            f"--template_file {args.template_file}: no such file (A1111's templates: examples/templates/)"
        )
    if args.resume_hypernetwork is not None and not os.path.isfile(args.resume_hypernetwork):
        raise UsageError(f"--resume_hypernetwork {args.resume_hypernetwork}: no such file")
    args.layer_structure = parse_floats(args.layer_structure, "--layer_structure")
    if len(args.layer_structure) < 2 or args.layer_structure[0] != 1 or args.layer_structure[-1] != 1:
        raise UsageError(f"--layer_structure {args.layer_structure}: must start and end with 1, e.g. 1,2,1")
    if args.dropout_structure is not None:
        args.dropout_structure = parse_floats(args.dropout_structure, "--dropout_structure")
    if args.activation_func not in ACTIVATIONS:
        raise UsageError(
            f"--activation_func {args.activation_func!r}: unknown; use one of {', '.join(sorted(ACTIVATIONS))}"
        )
    if args.enable_sizes != "auto":
        args.enable_sizes = [int(x) for x in parse_floats(args.enable_sizes, "--enable_sizes")]
    args.lr_schedule = parse_schedule(args.learning_rate, "--learning_rate")
    if len(args.lr_schedule) > 1 and args.lr_scheduler != "constant":
        raise UsageError("--learning_rate is an A1111 schedule; use it with --lr_scheduler constant")
    args.clip_grad_schedule = parse_schedule(args.clip_grad_value, "--clip_grad_value")
    for flag in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "resolution", "max_bad_steps"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be at least 1")
    if args.resolution % 8:
        raise UsageError(f"--resolution {args.resolution}: must be a multiple of 8")
    if not 0 <= args.tag_drop_out < 1:
        raise UsageError(f"--tag_drop_out {args.tag_drop_out}: must be in [0, 1)")
    if args.use_8bit_adam and args.optimizer != "AdamW":
        raise UsageError("--use_8bit_adam replaces --optimizer AdamW; do not give both")
    if not args.use_8bit_adam and not isinstance(getattr(torch.optim, args.optimizer, None), type):
        raise UsageError(f"--optimizer {args.optimizer!r}: not a torch.optim class (e.g. AdamW, Adam, SGD)")
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UsageError("--use_8bit_adam needs bitsandbytes: pip install 'hypernet[bnb]'") from None
    if args.hypernetwork_name is None:
        args.hypernetwork_name = os.path.basename(os.path.normpath(args.output_dir))
    if not re.fullmatch(r"[\w.\- ]+", args.hypernetwork_name):
        raise UsageError(f"--hypernetwork_name {args.hypernetwork_name!r}: use letters, digits, '.', '_', '-', ' '")
    args.preview_width = args.preview_width or args.resolution
    args.preview_height = args.preview_height or args.resolution
    if args.preview_prompt is None:
        args.preview_prompt = [f"a picture, art by {args.hypernetwork_name}"]


# ----------------------------------------------------------------------------------------------------------------
# Data: A1111's folder layout (or a datasets dataset), read once, encoded once, cached in memory.


def read_caption(path):
    """A caption file's text: UTF-8 (with or without BOM) or UTF-16 with BOM; other encodings are refused."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig").strip()
    except UnicodeDecodeError:
        raise UsageError(f"{path}: caption is not UTF-8 or UTF-16 text; re-save it as UTF-8") from None


def filewords_from_name(filename):
    """A1111's caption from a file name: the stem without its leading numbers and dashes."""
    return re.sub(r"^[-\d]+\s*", "", os.path.splitext(os.path.basename(filename))[0])


def read_image_file(path):
    """Open and fully decode an image file; a file PIL cannot read is refused by name."""
    try:
        if os.path.getsize(path) == 0:
            raise UsageError(f"{path}: empty file (0 bytes); remove it or replace it with the real image")
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
    except UsageError:
        raise
    except Image.DecompressionBombError as e:
        raise UsageError(f"{path}: image too large to read safely ({e}); downscale it first") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UsageError(f"{path}: unreadable image ({e}); fix or remove it") from None
    return image


def open_image(source, use_weight):
    """An image file, or an image from a datasets dataset, as RGB (RGBA with --use_weight when it has alpha);
    any mode PIL reads is accepted, 16-bit images are scaled to 8 bits."""
    image = read_image_file(source) if isinstance(source, str) else source
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / scale * 255.0, 0, 255).astype(np.uint8), "L")
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    return image.convert("RGBA" if use_weight and has_alpha else "RGB")


def scan_train_data_dir(data_dir):
    """(image path, caption) for every image in A1111's layout; captions from .txt files, else the file name."""
    entries = []
    for name in sorted(os.listdir(data_dir)):
        path = os.path.join(data_dir, name)
        if not name.lower().endswith(IMAGE_EXTENSIONS) or not os.path.isfile(path):
            continue
        caption_path = os.path.splitext(path)[0] + ".txt"
        caption = read_caption(caption_path) if os.path.isfile(caption_path) else filewords_from_name(name)
        entries.append((path, caption))
    if not entries:
        raise UsageError(f"--train_data_dir {data_dir}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return entries


def load_template(path):
    if path is None:
        return ["[filewords]"]
    with open(path, encoding="utf-8-sig") as f:
        lines = [line.strip() for line in f if line.strip()]
    if not lines:
        raise UsageError(f"--template_file {path}: empty; put one prompt template a line")
    if not any("[filewords]" in line for line in lines):
        logger.warning(f"{path} has no [filewords]: the images' captions are not used, every prompt comes from it")
    return lines


def make_caption(template_line, filewords, name, rng=None, shuffle_tags=False, tag_drop_out=0.0):
    """A1111's create_text: tags of the caption dropped and shuffled, then put into the template."""
    tags = filewords.split(",")
    if rng is not None and tag_drop_out:
        tags = [tag for tag in tags if rng.random() > tag_drop_out]
    if rng is not None and shuffle_tags:
        rng.shuffle(tags)
    return template_line.replace("[filewords]", ",".join(tags)).replace("[name]", name)


def training_size(image, args):
    if args.varsize:
        return max(64, image.width // 64 * 64), max(64, image.height // 64 * 64)
    return args.resolution, args.resolution


def to_training_pixels(image, size, center_crop, generator):
    """Resize the shorter side to fit `size`, then crop to it (center, or at a position drawn from `generator`)."""
    width, height = size
    scale = max(width / image.width, height / image.height)
    resized = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.BICUBIC
    )
    spare_x, spare_y = resized.width - width, resized.height - height
    if center_crop:
        left, top = spare_x // 2, spare_y // 2
    else:
        left = int(torch.randint(0, spare_x + 1, (1,), generator=generator))
        top = int(torch.randint(0, spare_y + 1, (1,), generator=generator))
    return resized.crop((left, top, left + width, top + height))


def sample_key(seed, *parts):
    """A seed for one sample's randomness, the same whatever the number of processes or where a run resumed."""
    key = seed
    for part in parts:
        key = (key * 1_000_003 + int(part)) % (1 << 62)
    return key


class CachedData:
    """Per image: latent mean/std (and the mirrored image's), caption, text embedding, loss weight map."""

    def __init__(self):
        self.means, self.stds, self.flipped_means, self.flipped_stds = [], [], [], []
        self.captions, self.filewords, self.embeddings, self.weights, self.sizes = [], [], [], [], []

    def __len__(self):
        return len(self.means)


def read_dataset_entries(args):
    """(image source, caption) pairs from --train_data_dir or --dataset_name; image sources are paths or PIL images."""
    if args.train_data_dir is not None:
        return scan_train_data_dir(args.train_data_dir)
    from datasets import load_dataset

    if os.path.isdir(args.dataset_name):
        dataset = load_dataset("imagefolder", data_dir=args.dataset_name, split="train")
    else:
        dataset = load_dataset(args.dataset_name, args.dataset_config_name, split="train")
    for column in (args.image_column, args.caption_column):
        if column not in dataset.column_names:
            raise UsageError(
                f"--dataset_name {args.dataset_name}: no column {column!r}; it has {', '.join(dataset.column_names)}"
            )
    if len(dataset) == 0:
        raise UsageError(f"--dataset_name {args.dataset_name}: the dataset is empty")
    return [(row[args.image_column], str(row[args.caption_column])) for row in dataset]


def check_images(entries, args):
    """Open every image once before any model loads, so a bad file stops the run at once, by name."""
    for source, _ in entries:
        size = open_image(source, args.use_weight).size
        if min(size) < 8:
            raise UsageError(f"{source}: image is {size[0]}x{size[1]}, too small to train on")


@torch.no_grad()
def cache_dataset(entries, template, args, vae, text_encoder, tokenizer, device, weight_dtype, show_progress):
    """Encode every image to latents once (and its mirror with --random_flip); embed fixed captions once."""
    from tqdm.auto import tqdm

    cache = CachedData()
    scaling = vae.config.scaling_factor
    fixed_captions = not (args.shuffle_tags or args.tag_drop_out)
    for index, (source, filewords) in enumerate(tqdm(entries, desc="Caching latents", disable=not show_progress)):
        generator = torch.Generator().manual_seed(sample_key(args.seed, 1, index))
        image = open_image(source, args.use_weight)
        size = training_size(image, args)
        image = to_training_pixels(image, size, args.center_crop, generator)
        variants = [image, image.transpose(Image.FLIP_LEFT_RIGHT)] if args.random_flip else [image]
        pixels = torch.stack([torch.from_numpy(np.asarray(v.convert("RGB"), dtype=np.float32)) for v in variants])
        pixels = (pixels / 127.5 - 1.0).permute(0, 3, 1, 2).to(device, weight_dtype)
        dist = vae.encode(pixels).latent_dist
        mean, std = dist.mean.float().cpu() * scaling, dist.std.float().cpu() * scaling
        if args.latent_sampling_method == "once":
            mean = mean + std * torch.randn(mean.shape, generator=generator)
        if args.latent_sampling_method != "random":
            std = torch.zeros_like(mean)
        cache.means.append(mean[0])
        cache.stds.append(std[0])
        cache.flipped_means.append(mean[-1])
        cache.flipped_stds.append(std[-1])
        cache.sizes.append(size)
        cache.filewords.append(filewords)
        line = template[int(torch.randint(0, len(template), (1,), generator=generator))]
        cache.captions.append(make_caption(line, filewords, args.hypernetwork_name))
        if args.use_weight:
            cache.weights.append(alpha_weight(image, mean.shape[1:]))
    if fixed_captions:
        for start in range(0, len(cache), 16):
            embeddings = encode_prompts(cache.captions[start : start + 16], text_encoder, tokenizer, device)
            cache.embeddings.extend(embeddings.cpu())
    return cache


def alpha_weight(image, latent_shape):
    """A1111's loss weight from the alpha channel: resized to the latent grid, shifted to min 0, scaled to mean 1."""
    channels, height, width = latent_shape
    if image.mode != "RGBA":
        return torch.ones(latent_shape)
    alpha = np.asarray(image.getchannel("A").resize((width, height), Image.BICUBIC), dtype=np.float32)
    weight = torch.from_numpy(alpha).expand(channels, height, width).clone()
    weight -= weight.min()
    mean = weight.mean()
    return weight / mean if mean > 0 else torch.ones(latent_shape)


def encode_prompts(prompts, text_encoder, tokenizer, device):
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids.to(device))[0]


class EpochBatchSampler(torch.utils.data.Sampler):
    """Full global batches of equal-sized images, in an order that depends only on the seed and the epoch.

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
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def __iter__(self):
        return iter(self.batches())

    def __len__(self):
        return sum(math.ceil(len(m) / self.batch_size) for m in self.groups.values())


def make_batch(indices, cache, epoch, args, text_encoder, tokenizer, template, device, num_train_timesteps):
    """Latents, noise, timesteps, text embeddings and weights for these dataset indices.

    Every random draw comes from a generator keyed by (seed, epoch, index), never from a process's global RNG.
    """
    latents, noises, timesteps, captions, weights = [], [], [], [], []
    for index in indices.tolist():
        generator = torch.Generator().manual_seed(sample_key(args.seed, 3, epoch, index))
        flip = args.random_flip and bool(torch.rand(1, generator=generator) < 0.5)
        mean = cache.flipped_means[index] if flip else cache.means[index]
        std = cache.flipped_stds[index] if flip else cache.stds[index]
        latent = (
            mean + std * torch.randn(mean.shape, generator=generator)
            if args.latent_sampling_method == "random"
            else mean
        )
        noise = torch.randn(latent.shape, generator=generator)
        if args.noise_offset:
            noise += args.noise_offset * torch.randn((latent.shape[0], 1, 1), generator=generator)
        latents.append(latent)
        noises.append(noise)
        timesteps.append(torch.randint(0, num_train_timesteps, (1,), generator=generator))
        if args.use_weight:
            weight = cache.weights[index]
            weights.append(weight.flip(-1) if flip else weight)
        if not cache.embeddings:
            rng = random.Random(sample_key(args.seed, 4, epoch, index))
            line = template[rng.randrange(len(template))]
            captions.append(
                make_caption(
                    line, cache.filewords[index], args.hypernetwork_name, rng, args.shuffle_tags, args.tag_drop_out
                )
            )
    if cache.embeddings:
        embeddings = torch.stack([cache.embeddings[i] for i in indices.tolist()]).to(device)
    else:
        with torch.no_grad():
            embeddings = encode_prompts(captions, text_encoder, tokenizer, device)
    return {
        "latents": torch.stack(latents).to(device),
        "noise": torch.stack(noises).to(device),
        "timesteps": torch.cat(timesteps).to(device),
        "encoder_hidden_states": embeddings,
        "weight": torch.stack(weights).to(device) if weights else None,
    }


# ----------------------------------------------------------------------------------------------------------------
# The model and one training step.


class UNetWithHypernetwork(torch.nn.Module):
    """The frozen UNet with the hypernetwork attached, as one module, so that DDP wraps a forward that runs the
    hypernetwork and therefore synchronises its gradients. The UNet's frozen parameters stay out of DDP's buckets."""

    def __init__(self, unet, hypernetwork):
        super().__init__()
        self.unet = unet
        self.hypernetwork = hypernetwork
        self.attachment = hypernet.attach(unet, [hypernetwork])

    def forward(self, noisy_latents, timesteps, encoder_hidden_states):
        return self.unet(noisy_latents, timesteps, encoder_hidden_states).sample


def diffusion_loss(model, noise_scheduler, batch, snr_gamma=None):
    """MSE between the UNet's prediction and the target (noise, or velocity for v-prediction models)."""
    latents, noise, timesteps = batch["latents"], batch["noise"], batch["timesteps"]
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    prediction = model(
        noisy_latents.to(batch["encoder_hidden_states"].dtype), timesteps, batch["encoder_hidden_states"]
    )
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if batch.get("weight") is not None:
        loss = loss * batch["weight"]
    loss = loss.mean(dim=list(range(1, loss.ndim)))
    if snr_gamma:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, timesteps)
        weights = torch.minimum(snr, torch.full_like(snr, snr_gamma))
        loss = loss * weights / (snr + 1 if noise_scheduler.config.prediction_type == "v_prediction" else snr)
    return loss.mean()


def make_optimizer(args, parameters):
    if args.use_8bit_adam:
        import bitsandbytes

        cls, name = bitsandbytes.optim.AdamW8bit, "AdamW8bit"
    else:
        cls, name = getattr(torch.optim, args.optimizer), args.optimizer
    kwargs = {"lr": 1.0, **fused_kwargs(cls, parameters)}
    if "Adam" in name:
        kwargs.update(
            betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon
        )
    return cls(parameters, **kwargs), name


def fused_kwargs(cls, parameters):
    """fused=True where torch has a fused kernel for this optimizer and these parameters: one kernel for all of
    them instead of several per tensor (on the CPU, AdamW over an SD 1.5 hypernetwork: 0.015 s against 0.07 s)."""
    supported = "fused" in inspect.signature(cls.__init__).parameters
    on_fused_devices = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in parameters)
    return {"fused": True} if supported and on_fused_devices else {}


def resume_optimizer_state(optimizer, state):
    """Load saved moments and hyperparameters; how this optimizer computes (fused, foreach) stays as it was built,
    whatever the optimizer that saved the state used."""
    implementation = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, keys in zip(optimizer.param_groups, implementation):
        group.update(keys)


def make_lr_scheduler(args, optimizer, initial_step):
    """Sets the absolute rate at each step: the optimizer's base rate is 1, the lambda returns the rate."""
    from diffusers.optimization import get_scheduler

    if len(args.lr_schedule) > 1 or args.lr_scheduler == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: rate_at(args.lr_schedule, initial_step + s))
    base = args.lr_schedule[0][0]
    for group in optimizer.param_groups:
        group["lr"] = base
    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=args.max_train_steps - initial_step,
    )


def load_models(args, weight_dtype=torch.float32):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path, common = args.pretrained_model_name_or_path, dict(revision=args.revision)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=args.revision)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=args.variant, **common)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=args.variant, **common)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=args.variant, **common)
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    for model in (text_encoder, vae, unet):
        model.requires_grad_(False)
        model.eval()
        model.to(dtype=weight_dtype)
    return tokenizer, text_encoder, vae, unet, noise_scheduler


def model_attention_widths(args):
    """The attention widths of the model's UNet, from its config alone (built on the meta device, no weights)."""
    from diffusers import UNet2DConditionModel

    try:
        config = UNet2DConditionModel.load_config(
            args.pretrained_model_name_or_path, subfolder="unet", revision=args.revision
        )
    except Exception as e:
        raise UsageError(
            f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: not a diffusers Stable Diffusion "
            f"folder ({str(e).splitlines()[0]})"
        ) from None
    with torch.device("meta"):
        return hypernet.attention_widths(UNet2DConditionModel.from_config(config))


def make_hypernetwork(args, model_widths):
    if args.resume_hypernetwork:
        hn = hypernet.load(args.resume_hypernetwork)
        hn.pt_keys, hn.pt_legacy_layout = None, False  # continue in the current A1111 layout
        hn.name = args.hypernetwork_name
        if hn.activation_func is None:
            hn.activation_func = "linear"  # the same modules; ComfyUI refuses None
    else:
        widths = model_widths if args.enable_sizes == "auto" else args.enable_sizes
        hn = hypernet.Hypernetwork(
            widths,
            name=args.hypernetwork_name,
            layer_structure=args.layer_structure,
            activation_func=args.activation_func,
            weight_init=args.weight_init,
            add_layer_norm=args.add_layer_norm,
            use_dropout=args.use_dropout or args.dropout_structure is not None,
            dropout_structure=args.dropout_structure,
            activate_output=args.activate_output,
        )
    if not set(hn.widths) & set(model_widths):
        raise UsageError(
            f"the hypernetwork's widths {hn.widths} do not match the model's attention widths {model_widths}; "
            "use --enable_sizes auto, or a hypernetwork made for this model family"
        )
    return hn.float()


# ----------------------------------------------------------------------------------------------------------------
# Files of a run.


def write_json(path, data):
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)


def write_loss_csv(path, rows):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["step", "epoch", "epoch_step", "loss", "learn_rate"])
    writer.writerows(rows)
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        f.write(buffer.getvalue())


def read_loss_csv(path, up_to_step):
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    return [row for row in rows if row and int(row[0]) <= up_to_step]


def plot_loss(rows, path, title):
    """A plain loss-per-step chart as PNG (no plotting library needed)."""
    width, height, margin = 640, 360, 48
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    points = [(int(r[0]), float(r[3])) for r in rows if r[3] not in ("nan", "inf", "-inf")]
    draw.text((margin, 12), title, fill="black")
    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    if len(points) >= 2:
        steps, losses = zip(*points)
        lo, hi = min(losses), max(losses)
        hi = hi if hi > lo else lo + 1e-8

        def xy(step, loss):
            x = margin + (step - steps[0]) / max(1, steps[-1] - steps[0]) * (width - 2 * margin)
            return x, height - margin - (loss - lo) / (hi - lo) * (height - 2 * margin)

        draw.line([xy(s, v) for s, v in points], fill=(200, 200, 255), width=1)
        window = max(1, len(points) // 20)
        smooth = [
            (points[i][0], sum(v for _, v in points[max(0, i - window + 1) : i + 1]) / min(window, i + 1))
            for i in range(len(points))
        ]
        draw.line([xy(s, v) for s, v in smooth], fill=(20, 60, 200), width=2)
        draw.text((4, margin - 6), f"{hi:.4f}", fill="black")
        draw.text((4, height - margin - 6), f"{lo:.4f}", fill="black")
        draw.text((margin, height - margin + 6), f"step {steps[0]}", fill="black")
        draw.text((width - margin - 60, height - margin + 6), f"step {steps[-1]}", fill="black")
    save_png(image, path)


def share_loss_and_stop_request(accelerator, loss, stop_requested):
    """The loss averaged over processes; a stop request (SIGTERM) seen by any process is recorded on all of them.

    One collective per micro-step carries both, so that every process skips, stops and saves at the same step.
    """
    local = torch.stack([loss.detach().float(), torch.tensor(float(bool(stop_requested)), device=loss.device)])
    shared = accelerator.gather(local.unsqueeze(0))
    if shared[:, 1].max().item() > 0 and not stop_requested:
        stop_requested.append("another process")
    return shared[:, 0].mean().item()


def check_ranks_agree(accelerator, hn):
    """With several processes, confirm that every one ends with bit-identical hypernetwork weights."""
    if accelerator.num_processes == 1:
        return
    import hashlib

    from accelerate.utils import gather_object

    digest = hashlib.sha256()
    for tensor in hn.state_dict().values():
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    digests = gather_object([digest.hexdigest()[:16]])
    if len(set(digests)) == 1:
        logger.info(f"hypernetwork weights identical on all {len(digests)} processes (sha256 {digests[0]})")
    else:
        logger.error(f"hypernetwork weights differ between processes: {digests}; gradients were not synchronised")


def fault_injection():
    """Test hooks (environment variables): HYPERNET_FAULT_NAN_STEPS=3,4 makes those steps' loss NaN;
    HYPERNET_FAULT_SLOW_SAVE=STEP:SECONDS pauses the checkpoint save at STEP half-way, before it is complete."""
    nan_steps = {int(s) for s in os.environ.get("HYPERNET_FAULT_NAN_STEPS", "").split(",") if s.strip()}
    slow_step, _, seconds = os.environ.get("HYPERNET_FAULT_SLOW_SAVE", "").partition(":")
    slow_save = (int(slow_step), float(seconds)) if seconds else None
    return nan_steps, slow_save


def list_checkpoints(output_dir):
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", d)]
    return sorted(names, key=lambda d: int(d.split("-")[1]))


def resolve_checkpoint(args):
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint == "latest":
        found = list_checkpoints(args.output_dir)
        if not found:
            logger.warning(f"--resume_from_checkpoint latest: no checkpoint in {args.output_dir}; starting a new run")
            return None
        return os.path.join(args.output_dir, found[-1])
    path = args.resume_from_checkpoint
    if not os.path.isdir(path) and os.path.isdir(os.path.join(args.output_dir, path)):
        path = os.path.join(args.output_dir, path)
    if not os.path.isfile(os.path.join(path, "hypernetwork.safetensors")):
        raise UsageError(
            f"--resume_from_checkpoint {args.resume_from_checkpoint}: not a checkpoint folder of this script"
        )
    return path


# ----------------------------------------------------------------------------------------------------------------


def main(input_args=None):
    args = parse_args(input_args)

    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    # Everything cheap is checked before any model or image is loaded.
    entries = read_dataset_entries(args)
    check_images(entries, args)
    template = load_template(args.template_file)
    model_widths = model_attention_widths(args)
    set_seed(args.seed)
    hn = make_hypernetwork(args, model_widths)
    unused_widths = sorted(set(hn.widths) - set(model_widths))

    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=bool(unused_widths))],
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        step_scheduler_with_optimizer=False,
    )
    if accelerator.device.type == "cpu":
        retain_freed_memory()  # every step reuses the last one's memory instead of page-faulting it in again
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)
    if unused_widths:
        logger.warning(
            f"widths {unused_widths} of the hypernetwork are not in this model ({model_widths}); they stay unused"
        )
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    tokenizer, text_encoder, vae, unet, noise_scheduler = load_models(args, weight_dtype)
    text_encoder.to(accelerator.device)
    vae.to(accelerator.device)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    cache = cache_dataset(
        entries,
        template,
        args,
        vae,
        text_encoder,
        tokenizer,
        accelerator.device,
        weight_dtype,
        accelerator.is_main_process,
    )
    initial_step = hn.step
    hn.sd_checkpoint = (
        base_model_hash(args.pretrained_model_name_or_path)
        if os.path.exists(args.pretrained_model_name_or_path)
        else None
    )
    hn.sd_checkpoint_name = os.path.basename(os.path.normpath(args.pretrained_model_name_or_path))
    hn.train()
    hn.requires_grad_(True)
    model = UNetWithHypernetwork(unet, hn)
    optimizer, optimizer_name = make_optimizer(args, list(hn.parameters()))
    if hn.optimizer_state_dict is not None and hn.optimizer_name == optimizer_name:
        resume_optimizer_state(optimizer, hn.optimizer_state_dict)
        logger.info(f"continuing the optimizer state of {args.resume_hypernetwork}")
    hn.optimizer_state_dict = None
    lr_scheduler = make_lr_scheduler(args, optimizer, initial_step)

    # Global batches, which accelerate splits across processes: every process count sees the same global batches.
    sampler = EpochBatchSampler(cache.sizes, args.train_batch_size * accelerator.num_processes, args.seed)
    # Its own generator: a new iterator would otherwise draw from the global RNG that dropout uses, at a point
    # that differs between a resumed run and an uninterrupted one.
    dataloader = torch.utils.data.DataLoader(
        range(len(cache)),
        batch_sampler=sampler,
        collate_fn=torch.tensor,
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed),
    )
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
    training_state = {"step": initial_step, "losses": [], "bad_steps": 0}

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            hypernet.save(
                accelerator.unwrap_model(model).hypernetwork, os.path.join(output_dir, "hypernetwork.safetensors")
            )
            write_json(os.path.join(output_dir, "training_state.json"), training_state)
        weights.clear()

    def load_model_hook(models, input_dir):
        models.clear()
        saved = hypernet.load(os.path.join(input_dir, "hypernetwork.safetensors"))
        accelerator.unwrap_model(model).hypernetwork.load_state_dict(saved.state_dict())
        with open(os.path.join(input_dir, "training_state.json")) as f:
            training_state.update(json.load(f))

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    steps_per_epoch = max(1, math.ceil(len(dataloader) / args.gradient_accumulation_steps))
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        settings = {
            **{k: v for k, v in vars(args).items() if k not in ("lr_schedule", "clip_grad_schedule")},
            "model_hash": hn.sd_checkpoint,
            "dataset_size": len(cache),
            "num_processes": accelerator.num_processes,
            "total_batch_size": total_batch_size,
            "optimizer_name": optimizer_name,
            "hypernet_version": hypernet.__version__,
        }
        write_json(os.path.join(args.output_dir, "training_settings.json"), settings)
        if args.report_to != "none":
            tracker_config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in settings.items()}
            accelerator.init_trackers(
                args.tracker_project_name,
                config=tracker_config,
                init_kwargs={"wandb": {"name": args.run_name or args.hypernetwork_name}},
            )

    checkpoint = resolve_checkpoint(args)
    if checkpoint:
        accelerator.load_state(checkpoint)
        logger.info(f"resumed from {checkpoint} at step {training_state['step']}")
    hn_unwrapped = accelerator.unwrap_model(model).hypernetwork
    step = training_state["step"]
    hn_unwrapped.step = step
    loss_window = deque(training_state["losses"], maxlen=3 * len(cache))
    csv_path = os.path.join(args.output_dir, "loss.csv")
    loss_rows = read_loss_csv(csv_path, step) if accelerator.is_main_process and checkpoint else []
    nan_steps, slow_save = fault_injection()

    logger.info(
        f"training {args.hypernetwork_name}: {len(cache)} images, widths {hn_unwrapped.widths}, "
        f"{sum(p.numel() for p in hn_unwrapped.parameters()):,} parameters, {accelerator.num_processes} process(es), "
        f"total batch {total_batch_size}, steps {step} -> {args.max_train_steps}"
    )

    def save_checkpoint():
        final = os.path.join(args.output_dir, f"checkpoint-{step}")
        partial = final + ".partial"
        if accelerator.is_main_process:
            existing = list_checkpoints(args.output_dir)
            if args.checkpoints_total_limit is not None:
                for name in existing[: max(0, len(existing) - args.checkpoints_total_limit + 1)]:
                    shutil.rmtree(os.path.join(args.output_dir, name))
            shutil.rmtree(partial, ignore_errors=True)
        accelerator.wait_for_everyone()
        training_state.update(step=step, losses=list(loss_window))
        accelerator.save_state(partial)
        if slow_save and slow_save[0] == step:
            time.sleep(slow_save[1])
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)  # a checkpoint-N folder is always complete
            write_loss_csv(csv_path, loss_rows)
        accelerator.wait_for_everyone()

    def save_snapshot(path, with_optimizer=True):
        hn_unwrapped.step = step
        state = optimizer.state_dict() if with_optimizer else None
        hypernet.save(hn_unwrapped, path, optimizer_state_dict=state, optimizer_name=optimizer_name)

    def make_previews():
        from diffusers import StableDiffusionPipeline

        hn_unwrapped.eval()
        rng_states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        pipeline = StableDiffusionPipeline.from_pretrained(
            args.pretrained_model_name_or_path,
            unet=accelerator.unwrap_model(model).unet,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
            torch_dtype=weight_dtype,
            revision=args.revision,
        )
        pipeline.set_progress_bar_config(disable=True)
        images = []
        for i, prompt in enumerate(args.preview_prompt):
            generator = torch.Generator(accelerator.device).manual_seed(args.preview_seed)
            with torch.no_grad(), accelerator.autocast():
                image = pipeline(
                    prompt,
                    negative_prompt=args.preview_negative_prompt or None,
                    num_inference_steps=args.preview_steps,
                    guidance_scale=args.preview_guidance_scale,
                    width=args.preview_width,
                    height=args.preview_height,
                    generator=generator,
                ).images[0]
            suffix = f"-{i}" if len(args.preview_prompt) > 1 else ""
            parameters = infotext(
                prompt,
                args.preview_negative_prompt,
                steps=args.preview_steps,
                sampler=type(pipeline.scheduler).__name__,
                cfg_scale=args.preview_guidance_scale,
                seed=args.preview_seed,
                width=args.preview_width,
                height=args.preview_height,
                model_hash=hn_unwrapped.sd_checkpoint,
                model=hn_unwrapped.sd_checkpoint_name,
                hypernetworks=[(args.hypernetwork_name, 1.0)],
            )
            save_png(
                image,
                os.path.join(args.output_dir, "images", f"{args.hypernetwork_name}-{step}{suffix}.png"),
                parameters,
            )
            images.append((prompt, image))
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images(
                    "preview", np.stack([np.asarray(im) for _, im in images]), step, dataformats="NHWC"
                )
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"preview": [wandb.Image(im, caption=p) for p, im in images]}, step=step)
        random.setstate(rng_states[0])
        np.random.set_state(rng_states[1])
        torch.set_rng_state(rng_states[2])
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        hn_unwrapped.train()

    def periodic_outputs():
        if args.save_every and step % args.save_every == 0:
            save_snapshot(os.path.join(args.output_dir, "hypernetworks", f"{args.hypernetwork_name}-{step}.pt"))
        if args.preview_every and step % args.preview_every == 0:
            make_previews()

    stop_requested = []
    previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: stop_requested.append(signum))

    progress = tqdm(
        total=args.max_train_steps, initial=step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    bad_in_step = False
    step_loss = 0.0
    outcome = "finished"
    epoch = (step - initial_step) // steps_per_epoch
    skip_batches = ((step - initial_step) % steps_per_epoch) * args.gradient_accumulation_steps
    trainable = list(hn_unwrapped.parameters())
    while step < args.max_train_steps and outcome == "finished":
        batches = accelerator.skip_first_batches(dataloader, skip_batches) if skip_batches else dataloader
        skip_batches = 0
        # accelerate's loader re-sets its batch sampler's epoch from its own counter on every pass: keep them equal.
        batches.set_epoch(epoch)
        sampler.set_epoch(epoch)
        for indices in batches:
            batch = make_batch(
                indices,
                cache,
                epoch,
                args,
                text_encoder,
                tokenizer,
                template,
                accelerator.device,
                noise_scheduler.config.num_train_timesteps,
            )
            with accelerator.accumulate(model):
                loss = diffusion_loss(model, noise_scheduler, batch, args.snr_gamma)
                if step + 1 in nan_steps:
                    loss = loss * float("nan")
                mean_loss = share_loss_and_stop_request(accelerator, loss, stop_requested)
                bad_in_step = bad_in_step or not math.isfinite(mean_loss)
                step_loss += mean_loss / args.gradient_accumulation_steps
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    if bad_in_step:
                        optimizer.zero_grad(set_to_none=True)
                    else:
                        clip_value = rate_at(args.clip_grad_schedule, step)
                        if args.clip_grad_mode == "norm":
                            grad_norm = accelerator.clip_grad_norm_(trainable, clip_value)
                        else:
                            if args.clip_grad_mode == "value":
                                accelerator.clip_grad_value_(trainable, clip_value)
                            else:
                                accelerator.unscale_gradients()
                            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, float("inf"))
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    lr_scheduler.step()
            if not accelerator.sync_gradients:
                continue

            step += 1
            hn_unwrapped.step = step
            learn_rate = optimizer.param_groups[0]["lr"]
            progress.update(1)
            epoch_step = (step - initial_step - 1) % steps_per_epoch + 1
            if bad_in_step:
                training_state["bad_steps"] += 1
                logger.warning(f"step {step}: non-finite loss ({step_loss}); step skipped, weights unchanged")
            else:
                training_state["bad_steps"] = 0
                loss_window.append(step_loss)
            if accelerator.is_main_process:
                loss_rows.append([step, epoch, epoch_step, f"{step_loss:.7f}", learn_rate])
                mean = sum(loss_window) / len(loss_window) if loss_window else float("nan")
                progress.set_postfix(loss=f"{mean:.4f}", lr=f"{learn_rate:.2e}", epoch=epoch)
            logs = {"loss": step_loss, "lr": learn_rate}
            if grad_norm is not None:
                logs["grad_norm"] = float(grad_norm)
            accelerator.log(logs, step=step)
            step_loss, bad_in_step = 0.0, False

            if training_state["bad_steps"] >= args.max_bad_steps:
                outcome = "bad"
            elif stop_requested:
                outcome = "stopped"
            if outcome != "finished" or step >= args.max_train_steps:
                break
            if accelerator.is_main_process:
                periodic_outputs()
                if step % 50 == 0:
                    write_loss_csv(csv_path, loss_rows)
            if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                save_checkpoint()
        else:
            epoch += 1

    progress.close()
    check_ranks_agree(accelerator, hn_unwrapped)
    if (outcome == "stopped" or args.checkpointing_steps) and not os.path.isdir(
        os.path.join(args.output_dir, f"checkpoint-{step}")
    ):
        save_checkpoint()  # so that --resume_from_checkpoint latest continues from where this run ended
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_loss_csv(csv_path, loss_rows)
        if outcome == "finished":
            periodic_outputs()  # before the final file, which may still fail
        final = os.path.join(args.output_dir, f"{args.hypernetwork_name}.pt")
        save_snapshot(final)
        if args.save_safetensors:
            save_snapshot(os.path.join(args.output_dir, f"{args.hypernetwork_name}.safetensors"), with_optimizer=False)
        plot_loss(loss_rows, os.path.join(args.output_dir, "loss.png"), f"{args.hypernetwork_name}: loss per step")
        logger.info(f"wrote {final} at step {step}")
    accelerator.end_training()
    accelerator.unwrap_model(model).attachment.detach()
    signal.signal(signal.SIGTERM, previous_handler)
    if outcome == "bad":
        raise HypernetError(
            f"stopped at step {step}: {args.max_bad_steps} non-finite losses in a row; the last good hypernetwork is "
            f"saved. Lower --learning_rate, use --clip_grad_mode norm, or try --mixed_precision bf16/no"
        )
    if outcome == "stopped":
        logger.info(f"stopped by SIGTERM at step {step}; continue with --resume_from_checkpoint latest")
    return 0


def cli():
    return run_script(main, "train_hypernetwork.py")


if __name__ == "__main__":
    sys.exit(cli())
