#!/usr/bin/env python
"""Train an AUTOMATIC1111-style hypernetwork on a frozen Stable Diffusion model, with accelerate.

    accelerate launch train_hypernetwork.py \\
        --pretrained_model_name_or_path MODEL --train_data_dir DATA --output_dir OUT --max_train_steps 2000

Only the hypernetwork trains; the UNet, text encoders and VAE stay frozen. See README.md for the full guide.
"""

import argparse
import atexit
import collections
import contextlib
import dataclasses
import functools
import hashlib
import inspect
import itertools
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import sys
import time
import types
import warnings
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import numpy as np
import torch
from PIL import Image

import hypernet
import hypernet.prompts
import hypernet.training
from hypernet import data, runs
from hypernet.attachment import (
    COMPILE_MODES,
    attention_widths_from_config,
    check_widths,
    compile_blocks,
    unused_widths,
)
from hypernet.errors import (
    ArgumentError,
    HypernetError,
    PrintableFormatter,
    UsageError,
    first_line,
    flag_errors,
    printable,
    run_script,
)
from hypernet.evaluation import read_samples, summary, write_before_after
from hypernet.files import atomic_write, check_writable_folder, write_failure
from hypernet.flags import MAX_SIDE, SIDE, check_flags, check_sampling_steps, parse_flags
from hypernet.hashing import cached_sha256, weights_id
from hypernet.images import Generation, infotext_prompt, sampler_name, save_png
from hypernet.memory import RETAIN_SETTINGS, apply_retain_setting, release_free_memory
from hypernet.models import resolve_model
from hypernet.modelspec import model_family, modelspec_metadata, tag_frequency, training_keys
from hypernet.module import WEIGHT_INITS, HypernetworkConfig, trainable_activations
from hypernet.optimizer_file import OPTIM_SUFFIX, OptimizerState
from hypernet.processes import Processes, check_shared_folder
from hypernet.publishing import card_description, file_hashes, hub_files, model_card, push_folder, write_card_files
from hypernet.scripts import HelpFormatter
from hypernet.training import (
    UNetWithHypernetwork,
    batch_to_device,
    diffusion_loss,
    load_models,
    make_lr_scheduler,
    make_optimizer,
    optimizer_settings,
    optimizer_state_problem,
    parse_schedule,
    rate_at,
    resume_optimizer_state,
    schedule_end,
    weights_digest,
)
from hypernet.verbosity import quiet_libraries

logger = logging.getLogger("train_hypernetwork")

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# Settings of the hypernetwork itself: a resumed file keeps its own, so giving a different one is an error.
HYPERNETWORK_FLAGS = (*(setting.name for setting in HypernetworkConfig.architecture()), "widths")
MAX_PARAMETERS = 2_000_000_000
RUN_FILES = ("training_settings.json",)  # beside NAME.pt, NAME.json and NAME.preview.png in the output folder
# hypernet.data's arguments and the flags that give them
DATA_FLAGS = {
    "data_dir": "--train_data_dir",
    "dataset_name": "--dataset_name",
    "image_column": "--image_column",
    "caption_column": "--caption_column",
    "store_dir": "--cache_dir",
}


def make_parser():
    parser = argparse.ArgumentParser(
        description="Train an AUTOMATIC1111-style hypernetwork with accelerate.", formatter_class=HelpFormatter
    )
    model_group = parser.add_argument_group("model")
    model_group.add_argument(
        "--pretrained_model_name_or_path",
        required=True,
        help="The base model: a diffusers folder, a single .safetensors/.ckpt checkpoint of SD 1.x, 2.x or SDXL (the "
        "file the webui loads; its family is read from the file), or a Hub id. A single file is converted once into "
        "a diffusers folder in hypernet's cache ($HYPERNET_CACHE_DIR/models, else ~/.cache/hypernet/models).",
    )
    model_group.add_argument(
        "--config",
        default=None,
        help="A diffusers folder of the same family whose configs (and tokenizers, scheduler) describe a single-file "
        "model; needed offline where that family's configs are not in the Hugging Face cache.",
    )
    model_group.add_argument(
        "--original_config", default=None, help="The original (LDM) .yaml config of a single-file model."
    )
    model_group.add_argument(
        "--pretrained_vae_model_name_or_path",
        default=None,
        help="A diffusers VAE folder to encode the images with instead of the model's own (for SDXL in fp16: one that "
        "is stable in fp16; without it SDXL's VAE encodes in float32).",
    )
    model_group.add_argument("--revision", default=None, help="Model revision to load (hub models only).")
    model_group.add_argument("--variant", default=None, help="Model file variant to load, e.g. fp16.")

    hypernetwork_group = parser.add_argument_group("hypernetwork")
    hypernetwork_group.add_argument(
        "--hypernetwork_name",
        default=None,
        help="Name of the hypernetwork ([name] in templates, file names). Default: the --resume_hypernetwork file's "
        "name, as the webui keeps it, else the name of --output_dir.",
    )
    hypernetwork_group.add_argument(
        "--resume_hypernetwork",
        default=None,
        help="Continue training this .pt/.safetensors file: its step carries on, and its optimizer state when its "
        ".optim companion's hash matches.",
    )
    add_architecture_flags(hypernetwork_group)
    hypernetwork_group.add_argument(
        "--widths",
        "--enable_sizes",
        dest="widths",
        default="auto",
        help="Attention widths to create modules for (the webui's enable_sizes), e.g. 768,320,640,1280; 'auto' = the "
        "loaded model's widths.",
    )

    data_group = parser.add_argument_group("data")
    data_group.add_argument(
        "--train_data_dir",
        default=None,
        help="Folder of images in A1111's layout: optional same-named .txt captions, else words from the file name.",
    )
    data_group.add_argument(
        "--dataset_name",
        default=None,
        help="A datasets dataset name, or a local imagefolder (images + metadata.jsonl), instead of --train_data_dir.",
    )
    data_group.add_argument("--dataset_config_name", default=None, help="Config name of --dataset_name.")
    data_group.add_argument("--image_column", default="image", help="Image column of --dataset_name.")
    data_group.add_argument("--caption_column", default="text", help="Caption column of --dataset_name.")
    data_group.add_argument(
        "--streaming",
        action="store_true",
        help="Read --dataset_name as a stream (datasets' streaming mode) instead of preparing it on disk first: "
        "read once, in order, while the latents are cached; images are checked as they arrive, not up front.",
    )
    data_group.add_argument(
        "--template_file",
        default=None,
        help="Prompt template file, one template a line, with [filewords] (the caption) and [name]. Default: the "
        "caption alone, as kohya's and diffusers' scripts train (the webui's 'Prompt template' field says "
        "style_filewords.txt, whose templates add 'art by [name]'). A1111's standard sets are in examples/templates/.",
    )
    data_group.add_argument(
        "--shuffle_tags", action="store_true", help="Shuffle the comma-separated tags of each caption."
    )
    data_group.add_argument(
        "--tag_drop_out", type=float, default=0.0, help="Drop each caption tag with this probability."
    )
    data_group.add_argument(
        "--use_weight", action="store_true", help="Use each image's alpha channel as a per-pixel loss weight."
    )
    data_group.add_argument(
        "--resolution",
        default="512",
        help="Training size in pixels: one side (square), or width,height such as 768,512 (the webui's Width and "
        "Height fields; kohya's --resolution).",
    )
    data_group.add_argument(
        "--image_fit",
        default="stretch",
        choices=data.IMAGE_FITS,
        help="How an image becomes the training size. stretch: resized to it whatever its proportions, nothing cut, "
        "as the webui trains (choose it to train as the webui does, or for images already of those proportions). "
        "crop: its short side scaled to fit and the rest cut (a random crop, or --center_crop): nothing distorted, "
        "the edges lost. bucket: resized to the aspect-ratio bucket of its proportions at about the training size's "
        "area, as kohya's scripts do, and batched within its bucket: nothing distorted, little cut (see "
        "--min_bucket_reso, --max_bucket_reso, --bucket_reso_steps, --bucket_no_upscale).",
    )
    data_group.add_argument(
        "--center_crop",
        action="store_true",
        help="With --image_fit crop or bucket: cut the centre; default: a random crop, fixed per image.",
    )
    data_group.add_argument(
        "--min_bucket_reso", type=int, default=256, help="--image_fit bucket: the smallest bucket side (kohya's)."
    )
    data_group.add_argument(
        "--max_bucket_reso", type=int, default=1024, help="--image_fit bucket: the largest bucket side (kohya's)."
    )
    data_group.add_argument(
        "--bucket_reso_steps",
        type=int,
        default=64,
        help="--image_fit bucket: bucket sides are multiples of this (kohya's).",
    )
    data_group.add_argument(
        "--bucket_no_upscale",
        action="store_true",
        help="--image_fit bucket: a bucket of each image's own proportions, never larger than the image; images "
        "larger than the training size's area are scaled down to it (kohya's).",
    )
    data_group.add_argument("--random_flip", action="store_true", help="Randomly mirror images horizontally.")
    data_group.add_argument(
        "--varsize",
        action="store_true",
        help="Train each image at its own size, as the webui's 'Do not resize images': nothing resized or cut; "
        "images of one size are batched together. Sides from 8 to 8192 pixels.",
    )
    data_group.add_argument(
        "--debug_dataset",
        default=None,
        metavar="DIR",
        help="Prepare the data as training would with these flags, write for each image DIR/STEM.png (the pixels the "
        "VAE encodes, at that size), DIR/STEM.txt (the prompt of its first use) and with --use_weight "
        "DIR/STEM.weight.npy (its loss weight at latent size), and exit without loading the model (kohya's name).",
    )
    data_group.add_argument(
        "--cache_dir",
        default=None,
        help="The record store: encoded latents and text embeddings, read from disk at every step, keyed by each "
        "image's content and crop, each prompt, and the VAE and text encoders, so that a second run or a resume "
        "encodes only what changed. Shared safely by several processes and runs; every node must see the same folder. "
        "Default: $HYPERNET_CACHE_DIR/records, else ~/.cache/hypernet/records.",
    )
    data_group.add_argument(
        "--encode_on_the_fly",
        action="store_true",
        help="Encode each batch's images and prompts at every step instead of storing their latents and embeddings "
        "(for a dataset too large to store; slower: bench/RESULTS.md). Not with --streaming.",
    )
    data_group.add_argument(
        "--clip_skip",
        type=int,
        default=1,
        help="The webui's Clip skip: 1 reads the text encoder's last layer, 2 the one before (NovelAI-derived anime "
        "models are used with 2). The webui applies it to SD 1.x only, and so does --text_encoding webui.",
    )
    data_group.add_argument(
        "--sdxl_clip_l_skip",
        action="store_true",
        help="The webui's 'Clip skip SDXL' setting: --clip_skip applies to SDXL's CLIP-L encoder too (its hidden "
        "state --clip_skip layers from the end); off, the webui reads CLIP-L's penultimate layer whatever Clip skip.",
    )
    data_group.add_argument(
        "--text_encoding",
        default="webui",
        choices=hypernet.prompts.TEXT_ENCODINGS,
        help="webui: prompts as the webui encodes them (any length in 75-token chunks, (emphasis:1.2), [less], "
        "BREAK); diffusers: as diffusers' pipelines do (plain text cut at 77 tokens; --clip_skip N as their "
        "clip_skip=N-1, on every model family).",
    )
    data_group.add_argument(
        "--latent_sampling_method",
        default="once",
        choices=hypernet.data.LATENT_SAMPLING_METHODS,
        help="Latents are encoded once and cached: 'once' samples them once, 'deterministic' uses the mean, "
        "'random' resamples from the cached mean and std at every use.",
    )

    training_group = parser.add_argument_group("training")
    training_group.add_argument("--output_dir", required=True, help="Where every file of the run is written.")
    training_group.add_argument(
        "--seed", type=int, default=0, help="Seed for weights, data order, noise and timesteps."
    )
    training_group.add_argument("--train_batch_size", type=int, default=1, help="Batch size per process.")
    training_group.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="Micro-batches accumulated per optimizer step."
    )
    training_group.add_argument(
        "--max_train_steps",
        type=int,
        default=1000,
        help="Train until the hypernetwork's step reaches this (counted like A1111, from the resumed file's step). The "
        "webui's 'Max steps' field says 100000: it runs until stopped by hand, where a script needs an end.",
    )
    training_group.add_argument(
        "--learning_rate",
        default="0.00001",
        help="As the webui's 'Hypernetwork Learning rate' field: a rate, or the webui's schedule such as '5e-5:100, 5e-6:1500, 5e-7': each rate until its step, the last "
        "to the end; a last rate with a step ends training there, as in the webui ('1e-3:500'), and -1 means to the "
        "end ('1e-3:100, 1e-4:-1').",
    )
    training_group.add_argument(
        "--lr_scheduler",
        default="constant",
        help="diffusers scheduler for a plain --learning_rate: constant, constant_with_warmup, linear, cosine, ...",
    )
    training_group.add_argument("--lr_warmup_steps", type=int, default=0, help="Warmup steps of --lr_scheduler.")
    training_group.add_argument(
        "--optimizer",
        default="AdamW",
        help="Optimizer: a torch.optim class by name, e.g. AdamW, Adam, SGD (as the webui).",
    )
    training_group.add_argument("--use_8bit_adam", action="store_true", help="Use bitsandbytes' AdamW8bit.")
    training_group.add_argument(
        "--adam_beta1", type=float, default=None, help="beta1 of the optimizer's betas; default: the class's own."
    )
    training_group.add_argument(
        "--adam_beta2", type=float, default=None, help="beta2 of the optimizer's betas; default: the class's own."
    )
    training_group.add_argument(
        "--adam_weight_decay",
        type=float,
        default=None,
        help="The optimizer's weight decay; default: the class's own, as the webui creates it (AdamW 0.01, Adam 0).",
    )
    training_group.add_argument(
        "--adam_epsilon", type=float, default=None, help="The optimizer's eps; default: the class's own."
    )
    training_group.add_argument(
        "--clip_grad_mode", default=None, choices=["value", "norm"], help="Clip gradients by value or by norm."
    )
    training_group.add_argument(
        "--clip_grad_value", default="0.1", help="Clipping threshold; may be an A1111 schedule string."
    )
    training_group.add_argument(
        "--mixed_precision",
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Mixed precision; default: accelerate's config. The hypernetwork's weights stay float32.",
    )
    training_group.add_argument(
        "--gradient_checkpointing", action="store_true", help="Trade compute for memory in the frozen UNet."
    )
    training_group.add_argument(
        "--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere and newer GPUs."
    )
    training_group.add_argument(
        "--torch_compile",
        action="store_true",
        help="Compile the UNet's repeated transformer blocks, hypernetwork wrappers inside, with torch.compile "
        "(regional compilation): the first step pays the compilation, later ones run faster on a GPU.",
    )
    training_group.add_argument(
        "--torch_compile_mode",
        default="default",
        choices=COMPILE_MODES,
        help="torch.compile's mode: reduce-overhead uses CUDA graphs (shapes stay fixed without --varsize).",
    )
    training_group.add_argument(
        "--snr_gamma", type=float, default=None, help="Min-SNR loss weighting gamma (5 is usual)."
    )
    training_group.add_argument(
        "--noise_offset", type=float, default=0.0, help="Noise offset, as in diffusers' scripts."
    )
    training_group.add_argument(
        "--max_bad_steps",
        type=int,
        default=10,
        help="Stop after this many bad steps in a row: a non-finite loss, or an optimizer step that makes the weights "
        "non-finite (each such step is skipped, back to the last good weights).",
    )
    training_group.add_argument(
        "--verbose",
        action="store_true",
        help="Show what the libraries hypernet runs on say (their warnings, deprecation notices and loading bars); "
        "by default they report errors only.",
    )
    training_group.add_argument(
        "--ddp_timeout",
        type=float,
        default=None,
        help="Minutes a process waits for the others at an exchange (kohya's flag) before the run stops with one line "
        "naming the process that went away. Default: torch's, 30 minutes with gloo, 10 with NCCL.",
    )
    training_group.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="DataLoader worker processes that assemble batches (latent sampling, captions, tokens); 0: in the main "
        "process. The batches are the same for any number.",
    )
    training_group.add_argument(
        "--retain_freed_memory",
        default="auto",
        choices=RETAIN_SETTINGS,
        help="Keep the memory a step frees for the next one instead of handing it back to the kernel (glibc only; "
        "the whole process's allocator). auto: on when training on the CPU, where it makes steps faster (bench/RESULTS.md).",
    )

    output_group = parser.add_argument_group("outputs")
    output_group.add_argument(
        "--save_every",
        type=int,
        default=500,
        help="Write hypernetworks/NAME-STEP.pt (+ .optim) every N steps; 0 = off.",
    )
    output_group.add_argument(
        "--save_safetensors",
        action="store_true",
        help="Also write safetensors/NAME.safetensors at the end: in a folder of its own, because ComfyUI, Easy "
        "Diffusion and ersatzForge list a .safetensors in a hypernetwork folder and apply nothing from it.",
    )
    output_group.add_argument(
        "--checkpointing_steps", type=int, default=500, help="Save an accelerate checkpoint every N steps; 0 = off."
    )
    output_group.add_argument(
        "--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints."
    )
    output_group.add_argument(
        "--resume_from_checkpoint", default=None, help="'latest' or a checkpoint-STEP folder to continue exactly."
    )
    output_group.add_argument(
        "--preview_every",
        "--validation_steps",
        dest="preview_every",
        type=int,
        default=500,
        help="Write images/NAME-STEP.png previews every N steps; 0 = off. --validation_steps is diffusers' name.",
    )
    output_group.add_argument(
        "--preview_prompt",
        "--validation_prompt",
        dest="preview_prompt",
        action="append",
        default=None,
        help="Preview prompt; repeat the flag for several. --validation_prompt is diffusers' name.",
    )
    output_group.add_argument(
        "--num_preview_images",
        "--num_validation_images",
        dest="num_preview_images",
        type=int,
        default=1,
        help="Previews per prompt, image i with --preview_seed + i. --num_validation_images is diffusers' name.",
    )
    output_group.add_argument("--preview_negative_prompt", default="", help="Negative prompt of the previews.")
    output_group.add_argument("--preview_seed", type=int, default=0, help="Seed of the previews.")
    output_group.add_argument("--preview_steps", type=int, default=20, help="Denoising steps of the previews.")
    output_group.add_argument("--preview_guidance_scale", type=float, default=7.0, help="CFG scale of the previews.")
    output_group.add_argument("--preview_width", type=int, default=None, help="Preview width (default: --resolution).")
    output_group.add_argument(
        "--preview_height", type=int, default=None, help="Preview height (default: --resolution)."
    )
    output_group.add_argument(
        "--report_to", default="none", choices=["none", "tensorboard", "wandb", "all"], help="Where to log."
    )
    output_group.add_argument("--tracker_project_name", default="hypernet", help="Tracker project name.")
    output_group.add_argument("--run_name", default=None, help="Tracker run name (default: the hypernetwork name).")
    output_group.add_argument("--logging_dir", default="logs", help="TensorBoard folder, relative to --output_dir.")
    output_group.add_argument(
        "--optional_info",
        default=None,
        help="A note stored in the .pt's optional_info (the webui keeps it) and as the description of the "
        "safetensors file and the model card.",
    )
    output_group.add_argument(
        "--push_to_hub",
        action="store_true",
        help="Upload the output folder to the Hugging Face Hub at the end: the hypernetwork, its card files, previews "
        "and loss chart, the model card, and training_settings.json with local paths reduced to names (no "
        "checkpoints, logs, intermediate files or optimizer state).",
    )
    output_group.add_argument(
        "--hub_optimizer_state",
        action="store_true",
        help="With --push_to_hub: upload NAME.pt.optim too (the optimizer state, a torch pickle, for whoever continues "
        "training).",
    )
    output_group.add_argument(
        "--hub_model_id", default=None, help="The Hub repository to push to (default: the output folder's name)."
    )
    output_group.add_argument(
        "--hub_token", default=None, help="The Hub token to push with (default: the one `hf auth login` stored)."
    )

    return parser


def add_architecture_flags(group):
    """A flag for each setting that shapes a new hypernetwork (HypernetworkConfig.architecture()), with its name,
    default and help; lists are given as comma-separated numbers."""
    defaults = HypernetworkConfig(widths=[])
    for setting in HypernetworkConfig.architecture():
        flag, text = f"--{setting.name}", HypernetworkConfig.help(setting.name)
        default = getattr(defaults, setting.name)
        if setting.name == "dropout_structure":
            group.add_argument(flag, default=None, help=text)
        elif isinstance(default, bool):
            group.add_argument(flag, action="store_true", help=text)
        elif isinstance(default, list):
            group.add_argument(flag, default=",".join(map(str, default)), help=text)
        elif setting.name == "weight_init":
            group.add_argument(flag, default=default, choices=WEIGHT_INITS, help=text)
        else:
            group.add_argument(flag, default=default, help=text)


def parse_args(input_args=None):
    parser = make_parser()
    argv = sys.argv[1:] if input_args is None else [str(a) for a in input_args]
    args = parse_flags(parser, argv)
    given = {
        a.dest
        for a in parser._actions
        for option in a.option_strings
        for word in argv
        if word == option or word.startswith(option + "=")
    }
    validate_args(args, given)
    return args


def parse_numbers(text, flag, kind=float):
    """'1,2,1' -> [1, 2, 1]: whole numbers stay ints, as the webui writes them; kind=int refuses fractions."""
    values = []
    for piece in str(text).split(","):
        piece = piece.strip()
        if re.fullmatch(r"[+-]?\d+", piece):
            values.append(int(piece))
            continue
        try:
            value = float(piece) if kind is float else None
        except ValueError:
            value = None
        if value is None or not math.isfinite(value):
            expected = "whole numbers such as 768,320,640,1280" if kind is int else "finite numbers such as 1,2,1"
            raise UsageError(f"{flag} {text!r}: expected comma-separated {expected}")
        values.append(value)
    return values


def validate_args(args, given=()):
    """Every flag checked before anything heavy happens; a problem is one line naming the flag."""
    if (args.train_data_dir is None) == (args.dataset_name is None):
        raise UsageError("give exactly one of --train_data_dir and --dataset_name")
    if args.streaming and args.dataset_name is None:
        raise UsageError("--streaming reads a --dataset_name; a --train_data_dir folder is read as it is")
    if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
        raise UsageError(f"--train_data_dir {args.train_data_dir}: no such folder")
    for flag in ("template_file", "resume_hypernetwork"):
        path = getattr(args, flag)
        if path is not None and not os.path.isfile(path):
            hint = " (the webui's templates: examples/templates/)" if flag == "template_file" else ""
            raise UsageError(f"--{flag} {path}: no such file{hint}")
    if args.pretrained_vae_model_name_or_path is not None and not os.path.isdir(
        args.pretrained_vae_model_name_or_path
    ):
        raise UsageError(
            f"--pretrained_vae_model_name_or_path {args.pretrained_vae_model_name_or_path}: no such folder"
        )
    args.layer_structure = parse_numbers(args.layer_structure, "--layer_structure")
    if args.dropout_structure is not None:
        args.dropout_structure = parse_numbers(args.dropout_structure, "--dropout_structure")
    if args.activation_func not in trainable_activations():
        raise UsageError(
            f"--activation_func {args.activation_func!r}: not an elementwise activation hypernet can train; use one "
            f"of {', '.join(trainable_activations())}"
        )
    try:
        HypernetworkConfig([], **architecture(args))
    except ArgumentError as e:
        raise e.about(f"--{e.argument}") from None
    if args.widths != "auto":
        args.widths = parse_numbers(args.widths, "--widths", kind=int)
        if any(w < 1 for w in args.widths):
            raise UsageError(f"--widths {args.widths}: widths must be positive")
    if args.resume_hypernetwork is not None:
        conflicting = sorted(given & set(HYPERNETWORK_FLAGS))
        if conflicting:
            raise UsageError(
                f"--resume_hypernetwork keeps the file's own settings; do not give {', '.join('--' + f for f in conflicting)}"
            )
    args.lr_schedule = parse_schedule(args.learning_rate, "--learning_rate")
    args.schedule_end = schedule_end(args.lr_schedule)
    if args.schedule_end is not None and args.schedule_end < args.max_train_steps:
        args.max_train_steps = args.schedule_end  # the webui ends training where its schedule ends
    if args.lr_scheduler not in LR_SCHEDULERS:
        raise UsageError(f"--lr_scheduler {args.lr_scheduler!r}: use one of {', '.join(LR_SCHEDULERS)}")
    if len(args.lr_schedule) > 1 and args.lr_scheduler != "constant":
        raise UsageError("--learning_rate is an A1111 schedule; use it with --lr_scheduler constant")
    args.clip_grad_schedule = parse_schedule(args.clip_grad_value, "--clip_grad_value")
    args.resolution = parse_resolution(args.resolution)
    check_image_fit(args, given)
    check_flags(args)
    for prompt in [*(args.preview_prompt or ()), args.preview_negative_prompt]:
        hypernet.prompts.parse_emphasis(prompt)
    if args.streaming and args.encode_on_the_fly:
        raise UsageError("--encode_on_the_fly reads images again at every step; a --streaming dataset is read once")
    if args.encode_on_the_fly and args.cache_dir is not None:
        raise UsageError("--encode_on_the_fly stores nothing; do not give --cache_dir with it")
    with flag_errors(path="--pretrained_model_name_or_path", config="--config", original_config="--original_config"):
        args.base_model = resolve_model(
            args.pretrained_model_name_or_path,
            args.config,
            args.original_config,
            args.revision,
            convert=args.debug_dataset is None,  # --debug_dataset reads nothing of a checkpoint file
        )
    args.model_folder = args.base_model.folder
    if args.use_8bit_adam and args.optimizer != "AdamW":
        raise UsageError("--use_8bit_adam replaces --optimizer AdamW; do not give both")
    check_optimizer(args)
    if args.hypernetwork_name is None and args.resume_hypernetwork is not None:
        args.hypernetwork_name = os.path.splitext(os.path.basename(args.resume_hypernetwork))[0]  # as the webui
    elif args.hypernetwork_name is None:
        args.hypernetwork_name = os.path.basename(os.path.abspath(args.output_dir))
    if not re.fullmatch(r"[\w\-][\w.\- ]*", args.hypernetwork_name):
        raise UsageError(
            f"--hypernetwork_name {args.hypernetwork_name!r}: use letters, digits, '.', '_', '-', ' ' (not first '.')"
        )
    args.preview_width = args.preview_width or args.resolution[0]
    args.preview_height = args.preview_height or args.resolution[1]
    check_flags(args)  # again: the preview sizes default to --resolution's
    if args.model_folder is not None:
        check_model_folder_flags(args)
    if args.cache_dir is not None:
        with flag_errors(path="--cache_dir"):
            check_writable_folder(args.cache_dir)
    if args.preview_prompt is None:
        args.preview_prompt = [f"a picture, art by {args.hypernetwork_name}"]
    check_output_dir(args)
    if args.hypernetwork_name + ".json" in RUN_FILES:
        raise UsageError(
            f"--hypernetwork_name {args.hypernetwork_name}: its card file would be the run's own "
            f"{args.hypernetwork_name}.json; choose another name"
        )
    if args.torch_compile_mode != "default" and not args.torch_compile:
        raise UsageError(
            f"--torch_compile_mode {args.torch_compile_mode} is for --torch_compile; add it or leave it out"
        )
    if args.torch_compile_mode == "reduce-overhead" and args.varsize:
        raise UsageError(
            "--torch_compile_mode reduce-overhead records CUDA graphs of fixed shapes, and --varsize "
            "batches change shape; use --torch_compile_mode default"
        )
    if args.push_to_hub:
        check_hub_login(args)
    elif args.hub_model_id or args.hub_token or args.hub_optimizer_state:
        raise UsageError(
            "--hub_model_id, --hub_token and --hub_optimizer_state are for --push_to_hub; add it or leave them out"
        )
    if args.report_to in ("wandb", "all"):
        check_wandb()
    if args.report_to in ("tensorboard", "all"):
        check_tensorboard(args.report_to)


def parse_resolution(text):
    """--resolution: 'SIZE' or 'WIDTH,HEIGHT', each a positive multiple of 8 up to MAX_SIDE -> (width, height)."""
    sizes = parse_numbers(text, "--resolution", kind=int)
    if len(sizes) not in (1, 2):
        raise UsageError(f"--resolution {text!r}: give one size (512) or width,height (768,512)")
    width, height = sizes * 2 if len(sizes) == 1 else sizes
    for side in (width, height):
        if not SIDE.allows(side):
            raise UsageError(f"--resolution {text}: {side} {SIDE.describe()}")
    return width, height


def check_image_fit(args, given):
    """--varsize keeps every image's size, so no fit applies; bucket flags are for --image_fit bucket."""
    bucket_flags = sorted(given & {"min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale"})
    if args.varsize and "image_fit" in given:
        raise UsageError(f"--varsize trains each image at its own size; do not give --image_fit {args.image_fit}")
    if bucket_flags and args.image_fit != "bucket":
        raise UsageError(f"--{bucket_flags[0]} is for --image_fit bucket; add it or leave the flag out")
    if args.center_crop and (args.varsize or args.image_fit == "stretch"):
        raise UsageError(
            "--center_crop cuts images: add --image_fit crop (or bucket); stretched and --varsize images are not cut"
        )
    if args.bucket_reso_steps < 8 or args.bucket_reso_steps % 8:
        raise UsageError(f"--bucket_reso_steps {args.bucket_reso_steps}: must be a positive multiple of 8")
    for flag in ("min_bucket_reso", "max_bucket_reso"):
        value = getattr(args, flag)
        if value < args.bucket_reso_steps or value % args.bucket_reso_steps or value > MAX_SIDE:
            raise UsageError(
                f"--{flag} {value}: must be a multiple of --bucket_reso_steps ({args.bucket_reso_steps}) up to "
                f"{MAX_SIDE}"
            )
    if args.min_bucket_reso > args.max_bucket_reso:
        raise UsageError(f"--min_bucket_reso {args.min_bucket_reso} is above --max_bucket_reso {args.max_bucket_reso}")


def check_hub_login(args):
    """What pushing needs that can be known before training: a token, the Hub not switched off, and a token not
    logged where the run's command line is (W&B records it)."""
    from huggingface_hub import constants, get_token

    if args.hub_token and args.report_to in ("wandb", "all"):
        raise UsageError(
            "--hub_token with --report_to wandb would log the token with the command line; log in with "
            "`hf auth login` (or set HF_TOKEN) instead"
        )
    if constants.HF_HUB_OFFLINE:
        raise UsageError(
            "--push_to_hub: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it or leave out --push_to_hub"
        )
    if not (args.hub_token or get_token()):
        raise UsageError("--push_to_hub: no Hugging Face token; run `hf auth login`, set HF_TOKEN or pass --hub_token")


OPTIMIZER_FLAGS = {"weight_decay": "--adam_weight_decay", "eps": "--adam_epsilon", "betas": "--adam_beta1"}


def optimizer_flags(args):
    """The optimizer settings the flags give: only those given, so that the rest are the class's defaults."""
    settings = {"weight_decay": args.adam_weight_decay, "eps": args.adam_epsilon}
    if args.adam_beta1 is not None or args.adam_beta2 is not None:
        cls, _ = hypernet.training.optimizer_class(args.optimizer, args.use_8bit_adam)
        default = inspect.signature(cls.__init__).parameters.get("betas")
        beta1, beta2 = default.default if default is not None else (0.9, 0.999)
        settings["betas"] = (
            beta1 if args.adam_beta1 is None else args.adam_beta1,
            beta2 if args.adam_beta2 is None else args.adam_beta2,
        )
    return {key: value for key, value in settings.items() if value is not None}


def check_optimizer(args):
    """The optimizer class takes these settings and parameters shaped as a hypernetwork's (matrices and vectors)."""
    shapes = [torch.zeros(2, 2, requires_grad=True), torch.zeros(2, requires_grad=True)]
    try:
        with flag_errors(name="--optimizer", use_8bit="--use_8bit_adam", **OPTIMIZER_FLAGS):
            make_optimizer(shapes, args.optimizer, args.use_8bit_adam, **optimizer_flags(args))
    except (ValueError, TypeError, RuntimeError, AssertionError) as e:
        raise UsageError(f"--optimizer {args.optimizer}: cannot train a hypernetwork ({first_line(e)})") from None


def model_config(folder, subfolder, name):
    """A JSON config of a model folder's part, {} where there is none; unreadable is one line naming it."""
    path = os.path.join(folder, subfolder, name)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: not a readable JSON config ({first_line(e)})") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path}: not a JSON object")
    return config


def check_model_folder_flags(args):
    """The flags that depend on the model folder: the clip skip its text encoder allows, the preview steps its
    scheduler has, the files --variant and --pretrained_vae_model_name_or_path name."""
    with flag_errors(clip_skip="--clip_skip"):
        hypernet.prompts.check_clip_skip(args.clip_skip, args.model_folder)
    timesteps = model_config(args.model_folder, "scheduler", "scheduler_config.json").get("num_train_timesteps", 1000)
    check_sampling_steps("--preview_steps", args.preview_steps, timesteps)
    check_model_files(args)


def check_model_files(args):
    """--variant names files the model has; --pretrained_vae_model_name_or_path is a VAE's folder."""
    if args.variant is not None:
        for part in ("unet", "vae", "text_encoder"):
            folder = os.path.join(args.model_folder, part)
            names = os.listdir(folder) if os.path.isdir(folder) else []
            if not any(f".{args.variant}." in name for name in names):
                raise UsageError(
                    f"--variant {args.variant}: {folder} has no file of that variant "
                    f"(such as diffusion_pytorch_model.{args.variant}.safetensors); leave --variant out"
                )
    vae = args.pretrained_vae_model_name_or_path
    if vae is not None:
        config = model_config(vae, "", "config.json")
        if config.get("_class_name") not in ("AutoencoderKL", None) or "latent_channels" not in config:
            raise UsageError(
                f"--pretrained_vae_model_name_or_path {vae}: not a VAE folder (its config.json is for "
                f"{config.get('_class_name') or 'no diffusers model'}, not AutoencoderKL)"
            )


def check_output_dir(args):
    """The output folder is creatable and writable, and not the data folder (its images and loss.png would mix)."""
    if args.train_data_dir is not None and os.path.realpath(args.output_dir) == os.path.realpath(args.train_data_dir):
        raise UsageError(f"--output_dir {args.output_dir}: is the --train_data_dir; write the run elsewhere")
    with flag_errors(path="--output_dir"):
        check_writable_folder(args.output_dir)


def check_tensorboard(report_to):
    try:
        import tensorboard  # noqa: F401  (what torch.utils.tensorboard, accelerate's tracker, writes with)
    except ImportError:
        raise UsageError(
            f"--report_to {report_to} needs TensorBoard: pip install 'hypernet[tensorboard]' (or pip install "
            "tensorboard)"
        ) from None


def check_wandb():
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UsageError(
            "--report_to wandb needs wandb: pip install 'hypernet[wandb]' (or pip install wandb)"
        ) from None
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return
    import netrc

    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return
    except (OSError, netrc.NetrcParseError):
        pass
    raise UsageError(
        "--report_to wandb: no W&B login; run `wandb login`, set WANDB_API_KEY, or WANDB_MODE=offline to log locally"
    )


def data_settings(args):
    return data.DataSettings(
        name=args.hypernetwork_name,
        resolution=args.resolution,
        image_fit=args.image_fit,
        center_crop=args.center_crop,
        random_flip=args.random_flip,
        varsize=args.varsize,
        use_weight=args.use_weight,
        latent_sampling_method=args.latent_sampling_method,
        shuffle_tags=args.shuffle_tags,
        tag_drop_out=args.tag_drop_out,
        seed=args.seed,
        min_bucket_reso=args.min_bucket_reso,
        max_bucket_reso=args.max_bucket_reso,
        bucket_reso_steps=args.bucket_reso_steps,
        bucket_no_upscale=args.bucket_no_upscale,
    )


def read_entries(args):
    with flag_errors(**DATA_FLAGS):
        if args.train_data_dir is not None:
            return data.folder_entries(args.train_data_dir)
        return data.dataset_entries(
            args.dataset_name, args.dataset_config_name, args.image_column, args.caption_column, args.streaming
        )


def debug_dataset(args, entries, template):
    """--debug_dataset: the data as training would prepare it, written as files; nothing else runs."""
    vae_folder, subfolder = args.pretrained_vae_model_name_or_path, ""
    if vae_folder is None:
        vae_folder, subfolder = args.model_folder, "vae"
    # A checkpoint file's VAE is SD's (4 channels, 1/8 of the pixels a side) in every family.
    config = {} if vae_folder is None else model_config(vae_folder, subfolder, "config.json")
    vae_config = types.SimpleNamespace(**{"latent_channels": 4, "block_out_channels": [0] * 4, **config})
    with flag_errors(path="--debug_dataset"):
        check_writable_folder(args.debug_dataset)
    count = data.write_debug_dataset(
        entries, template, data_settings(args), lambda size: data.latent_shape(vae_config, size), args.debug_dataset
    )
    print(printable(f"wrote the pixels and prompts of {count} images to {args.debug_dataset}"))
    return 0


def log_image_fit(args, records):
    """One line on how the images were fitted: the buckets and their images, or how many stretched images change
    proportions."""
    sizes = records.sizes()
    if args.varsize or args.image_fit == "bucket":
        buckets = collections.Counter(map(tuple, sizes.tolist()))
        table = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(buckets.items()))
        logger.info(f"{len(buckets)} bucket(s) of width x height: images: {table}")
    elif args.image_fit == "stretch":
        originals = records.original_sizes().astype(np.int64)
        width, height = args.resolution
        changed = np.abs(originals[:, 0] * height - originals[:, 1] * width) > 0.01 * originals[:, 1] * width
        if changed.any():
            logger.info(
                f"{int(changed.sum())} of {len(records)} images are not of the training size's proportions "
                f"({width}x{height}) and are stretched to it, as the webui trains; --image_fit crop or bucket keeps "
                "their proportions"
            )


def architecture(args):
    """The flags' values of the settings that shape a new hypernetwork."""
    return {setting.name: getattr(args, setting.name) for setting in HypernetworkConfig.architecture()}


def make_hypernetwork(args, model_widths):
    """The hypernetwork to train, new or --resume_hypernetwork's (continued in the current webui layout), and the
    optimizer state of the latter's .optim companion where it belongs to the file."""
    optimizer_state = None
    if args.resume_hypernetwork:
        loaded = hypernet.read(args.resume_hypernetwork, optimizer_state=True)
        hn, optimizer_state = loaded.hypernetwork, loaded.optimizer
        hn.config.name = args.hypernetwork_name
        if hn.config.activation_func is None:
            hn.config.activation_func = "linear"  # the same modules; ComfyUI refuses None
        if hn.config.step >= args.max_train_steps:
            raise UsageError(
                f"--resume_hypernetwork {args.resume_hypernetwork} is at step {hn.config.step} already; "
                f"--max_train_steps {args.max_train_steps} counts from 0, as the webui counts: give more"
            )
    else:
        widths = model_widths if args.widths == "auto" else args.widths
        for width in widths:
            if any(int(width * a) < 1 for a in args.layer_structure):
                raise UsageError(f"--layer_structure {args.layer_structure}: a layer of width {width} would be empty")
        parameters = sum(
            2 * (int(w * a) * int(w * b) + int(w * b))
            for w in widths
            for a, b in itertools.pairwise(args.layer_structure)
        )
        if parameters > MAX_PARAMETERS:
            raise UsageError(
                f"--layer_structure {args.layer_structure}: {parameters:,} parameters, more than {MAX_PARAMETERS:,}"
            )
        hn = hypernet.Hypernetwork(HypernetworkConfig(widths, name=args.hypernetwork_name, **architecture(args)))
    if args.optional_info is not None:
        hn.config.optional_info = args.optional_info
    try:
        check_widths(hn, model_widths, "the hypernetwork")
    except HypernetError as e:
        raise UsageError(f"{e}; use --widths auto") from None
    return hn.float(), optimizer_state


def make_accelerator(args, find_unused_parameters):
    from accelerate import Accelerator
    from accelerate.utils import (
        DataLoaderConfiguration,
        DistributedDataParallelKwargs,
        InitProcessGroupKwargs,
        ProjectConfiguration,
    )

    handlers = [DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)]
    if args.ddp_timeout is not None:
        handlers.append(InitProcessGroupKwargs(timeout=timedelta(minutes=args.ddp_timeout)))
    with joining_processes():
        return Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision,
            log_with=None if args.report_to == "none" else args.report_to,
            project_config=ProjectConfiguration(
                project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
            ),
            kwargs_handlers=handlers,
            dataloader_config=DataLoaderConfiguration(split_batches=True),
            step_scheduler_with_optimizer=False,
        )


@contextlib.contextmanager
def joining_processes():
    """A process group that cannot be formed is one line: where the processes meet, and what to check."""
    try:
        yield
    except RuntimeError as e:
        if "MASTER_ADDR" not in os.environ:
            raise
        raise HypernetError(
            f"could not join the run's other processes at {os.environ['MASTER_ADDR']}:"
            f"{os.environ.get('MASTER_PORT', '?')} ({first_line(e)}); every node must run the same command with the "
            "same master address and port, reach it, and use the interface the nodes share (GLOO_SOCKET_IFNAME, "
            "NCCL_SOCKET_IFNAME). In-job restarts (torchrun --max_restarts) do not rejoin: launch again with "
            "--resume_from_checkpoint latest"
        ) from None


def vae_weights_id(args):
    """What names the VAE's weights in latent cache keys."""
    path = args.pretrained_vae_model_name_or_path
    if path is None:
        return weights_id(args.model_folder, "vae")
    return weights_id(path, "vae") or weights_id(path, "")


def text_weights_id(args):
    """What names the text encoders and tokenizers in the store's keys of prompt embeddings."""
    model_path = args.model_folder
    parts = [weights_id(model_path, folder) for folder in ("text_encoder", "text_encoder_2")]
    for folder in ("tokenizer", "tokenizer_2"):
        for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
            path = os.path.join(model_path, folder, name)
            parts.append(cached_sha256(path)[:10] if os.path.isfile(path) else None)
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def on_main_process(accelerator, function, *args):
    """`function(*args)` computed by the main process alone and shared with the others."""
    from accelerate.utils import broadcast_object_list

    result = [function(*args) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(result)
    return result[0]


# -- files of a run -------------------------------------------------------------------------------------------


def write_json(path, content):
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        json.dump(content, f, indent=2, default=str)


# -- the run --------------------------------------------------------------------------------------------------


@dataclass
class RunState:
    """Where a run stands; saved in every checkpoint (training_state.json)."""

    step: int
    losses: deque
    bad_steps: int = 0
    stop: str = None  # why the run stops early: "signal" or "bad"
    signals: list = field(default_factory=list)  # the stop signals this process received
    stop_asked: bool = False  # whether any process received one: set from the step's gather alone, alike everywhere
    failure: HypernetError = None  # this process's error, raised on every process at the next step's gather
    run_id: str = None  # the same in every checkpoint of one run, resumed or not
    batch: dict = None  # runs.BATCH_KEYS: the processes and batch flags the run trains with
    last_preview: tuple = None  # (step, Generation of the first image) of this process's newest previews

    def to_json(self):
        return {
            "step": self.step,
            "losses": list(self.losses),
            "bad_steps": self.bad_steps,
            "run_id": self.run_id,
            "batch": self.batch,
        }


def resolve_checkpoint(args):
    """The checkpoint to resume from, checked before any model loads: its files are all there, it belongs to the run
    this folder holds, and it was made with the same hypernetwork settings."""
    if args.resume_from_checkpoint is None:
        return None
    try:
        path = runs.checkpoint_to_resume(args.output_dir, args.resume_from_checkpoint)
    except ArgumentError as e:
        raise e.about("--resume_from_checkpoint") from None
    if path is None:
        logger.warning(f"--resume_from_checkpoint latest: no checkpoint in {args.output_dir}; starting a new run")
        return None
    saved = hypernet.load(os.path.join(path, "hypernetwork.safetensors"))
    if args.resume_hypernetwork is None:
        wanted = HypernetworkConfig(saved.widths, **architecture(args))  # the flags' values as the config keeps them
        changed = {
            setting.name: getattr(saved.config, setting.name)
            for setting in HypernetworkConfig.architecture()
            if setting.name != "weight_init"  # initialisation only: a resumed run's weights are the checkpoint's
            and getattr(wanted, setting.name) != getattr(saved.config, setting.name)
        }
        if args.widths != "auto" and sorted(args.widths) != sorted(saved.widths):
            changed["widths"] = saved.widths
        if changed:
            raise UsageError(
                f"--resume_from_checkpoint {path} was made with other {', '.join('--' + f for f in changed)} "
                f"({', '.join(f'{f}={v!r}' for f, v in changed.items())}); give the same flags as the run that made it"
            )
    return path


def check_global_batch(checkpoint, batch):
    """A checkpoint continues with the global batch it was trained with (processes x --train_batch_size x
    --gradient_accumulation_steps): where the process count changed, the per-process flags must make up for it."""
    saved = runs.read_training_state(checkpoint).get("batch")
    if not saved or saved == batch:
        return
    size = math.prod(batch.values())
    if math.prod(saved.values()) == size:
        logger.info(
            f"{checkpoint} was trained by {saved['processes']} process(es), this run has {batch['processes']}: the "
            f"global batch stays {size} ({describe_batch(batch)})"
        )
        return
    wanted, processes = math.prod(saved.values()), batch["processes"]
    ways = [
        f"--{flag} {wanted // (processes * batch[other])}"
        for flag, other in (
            ("train_batch_size", "gradient_accumulation_steps"),
            ("gradient_accumulation_steps", "train_batch_size"),
        )
        if wanted % (processes * batch[other]) == 0
    ]
    ways.append(f"the checkpoint's {describe_batch(saved)}")
    raise UsageError(
        f"--resume_from_checkpoint {checkpoint} was trained with a global batch of {wanted} "
        f"({describe_batch(saved)}), this run's is {size} ({describe_batch(batch)}); continue it with "
        + ", or ".join(ways)
    )


def describe_batch(batch):
    return (
        f"{batch['processes']} process(es) x --train_batch_size {batch['train_batch_size']} x "
        f"--gradient_accumulation_steps {batch['gradient_accumulation_steps']}"
    )


def claim_output_dir(args, resuming):
    """One run per --output_dir (hypernet.runs.claim_output_dir), its errors about the flag."""
    try:
        return runs.claim_output_dir(args.output_dir, resuming)
    except ArgumentError as e:
        raise e.about("--output_dir") from None


def save_state_hook(accelerator, model, state, models, weights, output_dir):
    if accelerator.is_main_process:
        save_hypernetwork(
            accelerator.unwrap_model(model).hypernetwork,
            os.path.join(output_dir, "hypernetwork.safetensors"),
            state.step,
        )
        write_json(os.path.join(output_dir, "training_state.json"), state.to_json())
    weights.clear()


def load_state_hook(accelerator, model, state, models, input_dir):
    models.clear()
    saved = hypernet.load(os.path.join(input_dir, "hypernetwork.safetensors"))
    accelerator.unwrap_model(model).hypernetwork.load_state_dict(saved.state_dict())
    saved_state = runs.read_training_state(input_dir)
    state.step, state.bad_steps = saved_state["step"], saved_state["bad_steps"]
    state.run_id = saved_state.get("run_id") or state.run_id
    state.losses.extend(saved_state["losses"])


def save_checkpoint(accelerator, processes, args, state, loss_rows):
    """checkpoint-STEP, written as checkpoint-STEP.partial, sealed (runs.seal_checkpoint) and renamed when complete;
    only then are the oldest ones beyond --checkpoints_total_limit removed. A failure on any process fails all of
    them, and the checkpoints before it stay whole."""
    final = os.path.join(args.output_dir, f"checkpoint-{state.step}")
    partial = final + ".partial"

    def write_state():
        try:
            accelerator.save_state(partial)
        except (OSError, RuntimeError) as e:
            reason = write_failure(e, partial)
            if reason is None:
                raise
            raise HypernetError(f"{partial}: could not write the checkpoint ({reason})") from None

    def complete():
        try:
            runs.seal_checkpoint(partial)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
        except OSError as e:
            raise HypernetError(
                f"{partial}: could not complete the checkpoint ({write_failure(e, partial)})"
            ) from None
        if args.checkpoints_total_limit is not None:
            existing = runs.list_checkpoints(args.output_dir)
            for name in existing[: max(0, len(existing) - args.checkpoints_total_limit)]:
                shutil.rmtree(os.path.join(args.output_dir, name))
        runs.write_loss_csv(os.path.join(args.output_dir, "loss.csv"), loss_rows)

    processes.on_main(shutil.rmtree, partial, True)
    try:
        processes.together(write_state)
        processes.on_main(complete, share=False)
    except HypernetError:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        raise


def check_finite(hn, where):
    bad = [name for name, p in hn.state_dict().items() if not torch.isfinite(p).all()]
    if bad:
        raise HypernetError(
            f"{where}: refusing to save non-finite weights ({bad[0]}); this is a bug, please report it"
        )


def save_hypernetwork(hn, path, step, optimizer=None, optimizer_name=None, metadata=None):
    """The hypernetwork as a file of the run at `step`: the run's step (RunState.step) becomes the file's."""
    check_finite(hn, path)
    hn.config.step = step
    state = None if optimizer is None else OptimizerState(optimizer_name, optimizer.state_dict())
    hypernet.save(hn, path, state, metadata=metadata)


def training_metadata(args):
    """What a .safetensors file records of how it was trained beside the webui's keys: the text conditioning."""
    recorded = {"clip_skip": args.clip_skip, "text_encoding": args.text_encoding}
    return {**recorded, "sdxl_clip_l_skip": True} if args.sdxl_clip_l_skip else recorded


@dataclass
class RunSummary:
    """What the files a run leaves for others say about it: base model, steps, data, settings, times."""

    family: str  # hypernet.modelspec.FAMILIES
    prediction_type: str
    base_model_name: str
    base_model_hash: str
    steps: int
    images: int
    dataset: str
    tags: dict
    started_at: float
    finished_at: float
    settings: dict  # the settings that matter, by flag name


def run_summary(args, models, hn, records, state, optimizer_name, total_batch_size, mixed_precision, started_at):
    prediction_type = models.noise_scheduler.config.get("prediction_type", "epsilon")
    settings = {
        "layer_structure": ", ".join(f"{v:g}" for v in hn.config.layer_structure),
        "activation_func": hn.config.activation_func,
        "add_layer_norm": hn.config.add_layer_norm,
        "dropout_structure": (
            ", ".join(f"{v:g}" for v in hn.config.dropout_structure) if hn.config.use_dropout else "none"
        ),
        "weight_init": hn.config.weight_init,
        "learning_rate": args.learning_rate,
        "lr_scheduler": args.lr_scheduler,
        "optimizer": optimizer_name,
        "total_batch_size": total_batch_size,
        "resolution": "x".join(map(str, args.resolution)),
        "image_fit": "varsize" if args.varsize else args.image_fit,
        "clip_skip": args.clip_skip,
        "text_encoding": args.text_encoding,
        "mixed_precision": mixed_precision,
        "seed": args.seed,
    }
    return RunSummary(
        family=model_family(hn.widths, models.sdxl, prediction_type),
        prediction_type=prediction_type,
        base_model_name=hn.config.sd_checkpoint_name,
        base_model_hash=hn.config.sd_checkpoint,
        steps=state.step,
        images=len(records),
        dataset=os.path.basename(os.path.normpath(args.train_data_dir or args.dataset_name)),
        tags=tag_frequency(records.captions[i] for i in range(len(records))),
        started_at=started_at,
        finished_at=time.time(),
        settings=settings,
    )


def safetensors_metadata(args, hn, run):
    """training_metadata, ModelSpec keys and kohya's training keys, for safetensors/NAME.safetensors."""
    kohya = {
        "learning_rate": args.learning_rate,
        "lr_scheduler": args.lr_scheduler,
        "optimizer": run.settings["optimizer"],
        "seed": args.seed,
        "clip_skip": args.clip_skip,
        "batch_size_per_device": args.train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "mixed_precision": run.settings["mixed_precision"],
        "noise_offset": args.noise_offset,
        "min_snr_gamma": args.snr_gamma,
        "output_name": args.hypernetwork_name,
        "training_comment": args.optional_info,
    }
    date = datetime.fromtimestamp(run.finished_at, timezone.utc)
    return {
        **training_metadata(args),
        **modelspec_metadata(hn, args.hypernetwork_name, run.family, args.resolution, run.prediction_type, date),
        **training_keys(
            run.family,
            run.base_model_name,
            run.base_model_hash,
            args.resolution,
            run.steps,
            run.images,
            run.tags,
            run.dataset,
            run.started_at,
            run.finished_at,
            {k: v for k, v in kohya.items() if v is not None},
        ),
    }


def newest_previews(args):
    """(step, [(prompt, path relative to --output_dir), ...]) of the newest previews in images/, the prompts read
    from their infotext; (None, []) where there are none."""
    folder = os.path.join(args.output_dir, "images")
    pattern = re.compile(rf"{re.escape(args.hypernetwork_name)}-(\d+)((?:-\d+)*)\.png")
    found = {}
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        if match := pattern.fullmatch(name):
            found.setdefault(int(match[1]), []).append(name)
    if not found:
        return None, []
    step = max(found)
    previews = []
    for name in sorted(
        found[step], key=lambda n: [int(p) for p in re.findall(r"\d+", n[len(args.hypernetwork_name) :])]
    ):
        with Image.open(os.path.join(folder, name)) as image:
            prompt, _ = infotext_prompt(image.info.get("parameters", ""))
        previews.append((prompt, f"images/{name}"))
    return step, previews


def publish_run(args, hn, final, run, last_preview, repo_id):
    """Beside NAME.pt, the webui's Extra Networks card files; README.md, the model card; with --push_to_hub, the
    folder uploaded. The card's preview is the newest one; where it shows this file's weights (made at the final
    step in this run), its infotext names this file and its hash."""
    step, previews = newest_previews(args)
    infotext = None
    if previews and last_preview is not None and last_preview[0] == step == run.steps:
        infotext = dataclasses.replace(
            last_preview[1], hypernetworks=[(args.hypernetwork_name, 1.0, file_hashes(final)["webui"])]
        ).infotext()
    shown = {k: run.settings[k] for k in ("layer_structure", "activation_func", "learning_rate", "total_batch_size")}
    description = card_description(run.base_model_name, run.steps, run.images, shown)
    if hn.config.optional_info:
        description += f" {hn.config.optional_info}"
    notes = "\n".join(f"{key}: {value}" for key, value in {**run.settings, "hypernet": hypernet.__version__}.items())
    preview = os.path.join(args.output_dir, previews[0][1]) if previews else None
    write_card_files(final, preview, description, notes, infotext)
    card = model_card(
        args.hypernetwork_name,
        args.pretrained_model_name_or_path,
        description,
        previews,
        {"steps": run.steps, "images": run.images, **run.settings},
        hub_files(args.output_dir, extra=["README.md"], optimizer_state=args.hub_optimizer_state),
        repo_id,
    )
    readme = os.path.join(args.output_dir, "README.md")
    with atomic_write(readme) as tmp:
        card.save(tmp)
    if repo_id is not None:
        try:
            push_folder(repo_id, args.output_dir, args.hub_token, args.hub_optimizer_state)
        except Exception as e:  # an HTTP or network error: the files are all here
            raise HypernetError(
                f"--push_to_hub: uploading to {repo_id} failed ({first_line(e)}); every file is in "
                f"{args.output_dir}: upload it with `hf upload {repo_id} {args.output_dir}`"
            ) from None
        logger.info(f"pushed {args.output_dir} to https://huggingface.co/{repo_id}")


def folder_size(path):
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def run_report(args, final, stored, style=()):
    """What the run wrote, one line each (with `style`, the before/after grid's summary), and what to do next: the
    lines a run ends with."""
    out, name = args.output_dir, args.hypernetwork_name
    lines = ["wrote:"]

    def line(path, what):
        if os.path.exists(path):
            lines.append(f"  {path}: {what}")

    line(final, "the hypernetwork, for the webui, ComfyUI and diffusers")
    line(final + OPTIM_SUFFIX, "its optimizer state; the webui continues training from it")
    line(os.path.join(out, "safetensors", f"{name}.safetensors"), "the same weights as safetensors, for diffusers")
    line(os.path.join(out, f"{name}.preview.png"), "its card's image in the webui's Extra Networks")
    line(os.path.join(out, f"{name}.json"), "its card's description and notes in the webui")
    line(os.path.join(out, "README.md"), "the model card")
    step, newest = newest_previews(args)
    if newest:
        count = len(os.listdir(os.path.join(out, "images")))
        shown = ", ".join(os.path.basename(path) for _, path in newest)
        lines.append(f"  {os.path.join(out, 'images')}: {count} previews; step {step}'s: {shown}")
    line(preview_grid_path(args, step), f"step {step}'s previews in one grid")
    line(preview_grid_path(args, "base"), "the base model's (multiplier 0) grid")
    line(
        before_after_path(args), f"the base model's previews and step {step}'s side by side, with their style figures"
    )
    lines += [f"    {text}" for text in style]
    line(os.path.splitext(before_after_path(args))[0] + ".json", "those figures, each image's and their means")
    line(os.path.join(out, "loss.png"), "the loss per step")
    line(
        os.path.join(out, "loss.csv"), "the loss and learning rate of every step, as the webui's hypernetwork_loss.csv"
    )
    line(os.path.join(out, "hypernetworks"), "the hypernetwork every --save_every steps")
    checkpoints = runs.list_checkpoints(out)
    if checkpoints:
        line(os.path.join(out, checkpoints[-1]), "the newest checkpoint; --resume_from_checkpoint latest continues it")
    line(os.path.join(out, "training_settings.json"), "every setting of the run")
    if stored:
        store = args.cache_dir or data.default_store_dir()
        lines.append(f"  {store}: the record store, {folder_size(store) / 2**20:.1f} MiB (later runs reuse it)")
    lines += [
        "next:",
        f"  python generate.py --pretrained_model_name_or_path {shlex.quote(args.pretrained_model_name_or_path)} "
        f"--hypernetwork_dir {shlex.quote(out)} --prompt {shlex.quote(f'<hypernet:{name}:1> {args.preview_prompt[0]}')} "
        f"--output_dir {shlex.quote(os.path.join(out, 'generated'))}",
        f"  the webui: copy {name}.pt, {name}.preview.png and {name}.json into its models/hypernetworks/ and write "
        f"<hypernet:{name}:1> in a prompt",
    ]
    return lines


def create_hub_repo(args):
    """The Hub repository of --push_to_hub, created now (where it is not there) so that a refusal comes before
    training, not after."""
    from huggingface_hub import create_repo

    repo = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    try:
        return create_repo(repo, exist_ok=True, token=args.hub_token).repo_id
    except Exception as e:  # an HTTP, network or validation error: each is one line here
        raise UsageError(f"--push_to_hub: could not create the Hub repository {repo}: {first_line(e)}") from None


def preview_pipeline(args, models, unet, weight_dtype):
    from diffusers import DiffusionPipeline

    components = {
        "unet": unet,
        "vae": models.vae,
        "text_encoder": models.text_encoders[0],
        "tokenizer": models.tokenizers[0],
    }
    if models.sdxl:
        components.update(text_encoder_2=models.text_encoders[1], tokenizer_2=models.tokenizers[1])
    else:
        components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline = DiffusionPipeline.from_pretrained(
        args.model_folder, revision=args.revision, torch_dtype=weight_dtype, **components
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def preview_hypernetwork(args, step):
    """How previews name the hypernetwork: the file of this step's weights, hypernetworks/NAME-STEP.pt, with its
    short hash where --save_every wrote one at this step; else the run's name, without a hash."""
    path = os.path.join(args.output_dir, "hypernetworks", f"{args.hypernetwork_name}-{step}.pt")
    if args.save_every and step % args.save_every == 0 and os.path.isfile(path):
        return f"{args.hypernetwork_name}-{step}", file_hashes(path)["webui"]
    return args.hypernetwork_name, None


def preview_path(args, step, prompt_index, image_index):
    """images/NAME-STEP[-P][-I].png: P the preview prompt's index where there are several, I the image's where
    --num_preview_images is above 1."""
    suffix = f"-{prompt_index}" if len(args.preview_prompt) > 1 else ""
    suffix += f"-{image_index}" if args.num_preview_images > 1 else ""
    return os.path.join(args.output_dir, "images", f"{args.hypernetwork_name}-{step}{suffix}.png")


def preview_grid_path(args, step):
    """images/NAME-STEP-grid.png: all of a step's previews, a row per prompt."""
    return os.path.join(args.output_dir, "images", f"{args.hypernetwork_name}-{step}-grid.png")


def log_previews(accelerator, args, models, prompt_encoder, model, hn, step, weight_dtype, base=False):
    """Preview images of the hypernetwork as it is now, with webui infotext, logged to the trackers under
    "validation" with their prompts as captions, as diffusers' scripts log them, and, where there are several, as
    one grid (NAME-STEP-grid.png); with `base`, the base model's images (multiplier 0, NAME-base.png) to compare
    them with. The random number generators are left as they were, so previews change nothing about the training."""
    pipeline = preview_pipeline(args, models, accelerator.unwrap_model(model).unet, weight_dtype)
    name, short_hash = preview_hypernetwork(args, step)
    images, generations = [], []
    hn.eval()
    multiplier = hn.multiplier
    if base:
        hn.set_multiplier(0.0)  # x + mlp(x) * 0: the base model's context exactly
        merged = contextlib.nullcontext()
    else:
        merged = accelerator.unwrap_model(model).attachment.merged()  # baked once for all the previews' steps
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), merged:
        for i, prompt in enumerate(args.preview_prompt):
            generation = Generation(
                prompt=prompt,
                negative_prompt=args.preview_negative_prompt,
                steps=args.preview_steps,
                sampler=sampler_name(pipeline.scheduler),
                cfg_scale=args.preview_guidance_scale,
                seed=args.preview_seed,
                width=args.preview_width,
                height=args.preview_height,
                model_hash=hn.config.sd_checkpoint,
                model=hn.config.sd_checkpoint_name,
                hypernetworks=[] if base else [(name, 1.0, short_hash)],
                clip_skip=args.clip_skip if prompt_encoder.clip_skip_applies else 1,
            )
            with accelerator.autocast():
                batch = generation.images(pipeline, prompt_encoder, accelerator.device, args.num_preview_images)
            for j, image in enumerate(batch):
                one = dataclasses.replace(generation, seed=args.preview_seed + j)
                save_png(image, preview_path(args, "base" if base else step, i, j), one.infotext())
                images.append((prompt, image))
                generations.append(one)
    hn.set_multiplier(multiplier)
    hn.train()
    if len(images) > 1:
        from diffusers.utils import make_image_grid

        grid = make_image_grid([im for _, im in images], len(args.preview_prompt), args.num_preview_images)
        save_png(grid, preview_grid_path(args, "base" if base else step))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(
                "validation", np.stack([np.asarray(im) for _, im in images]), step, dataformats="NHWC"
            )
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(im, caption=p) for p, im in images]}, step=step)
    return generations[0]


STYLE_IMAGES = 64  # training images the before/after grid measures the style against, spread over the dataset


def before_after_path(args):
    return os.path.join(args.output_dir, f"{args.hypernetwork_name}.before-after.png")


def write_run_before_after(args, step, entries):
    """NAME.before-after.png: the base model's previews and the final step's side by side (each prompt a row, its
    seeds at multiplier 0, then 1), each with its colour distance to the training images; the figures in
    NAME.before-after.json. Returns the summary lines of the report."""
    paths = [
        preview_path(args, at, i, j)
        for at in ("base", step)
        for i in range(len(args.preview_prompt))
        for j in range(args.num_preview_images)
    ]
    samples = read_samples([path for path in paths if os.path.isfile(path)])
    return summary(write_before_after(before_after_path(args), samples, entries.spread(STYLE_IMAGES)))


def periodic_outputs(
    accelerator, args, models, prompt_encoder, model, hn, state, optimizer, optimizer_name, weight_dtype
):
    """hypernetworks/NAME-STEP.pt every --save_every steps, previews every --preview_every steps (recorded as the
    run's last preview)."""
    step = state.step
    if args.save_every and step % args.save_every == 0:
        path = os.path.join(args.output_dir, "hypernetworks", f"{args.hypernetwork_name}-{step}.pt")
        save_hypernetwork(hn, path, step, optimizer, optimizer_name)
    if args.preview_every and step % args.preview_every == 0:
        generation = log_previews(accelerator, args, models, prompt_encoder, model, hn, step, weight_dtype)
        state.last_preview = (step, generation)


def share_loss_and_stop(accelerator, processes, loss, state):
    """The loss averaged over processes; a stop signal or an error on any process is known to all of them.

    One collective per micro-step carries the three, so that every process skips, stops, saves or fails at the same
    step: the decision to stop is taken from what the gather returned, never from this process's own flags, which a
    signal may change at any moment.
    """
    flags = [float(bool(state.signals)), float(state.failure is not None)]
    local = torch.cat([loss.detach().float().reshape(1), torch.tensor(flags, device=loss.device)])
    shared = accelerator.gather(local.unsqueeze(0))
    signalled, failed = (shared[:, 1:].max(dim=0).values > 0).tolist()
    if failed:
        processes.raise_first(state.failure)
    state.stop_asked = state.stop_asked or signalled
    return shared[:, 0].mean().item()


def optimizer_step(accelerator, optimizer, lr_scheduler, parameters, last_good, bad, clip_mode, clip_value):
    """Clip and step; for a step with a non-finite loss, drop its gradients and go back to the last good weights
    (the ones before the previous step, which made this loss); for a step that makes the weights or the optimizer
    state non-finite, go back to the weights before it. Returns the gradient norm, the learning rate the step used
    and whether the step made the weights non-finite."""
    grad_norm, learn_rate, overflowed = None, optimizer.param_groups[0]["lr"], False
    if bad:
        optimizer.zero_grad(set_to_none=True)
        last_good.restore()
    else:
        last_good.keep()
        if clip_mode == "norm":
            grad_norm = accelerator.clip_grad_norm_(parameters, clip_value)
        else:
            if clip_mode == "value":
                accelerator.clip_grad_value_(parameters, clip_value)
            else:
                accelerator.unscale_gradients()
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not last_good.finite():
            last_good.restore()
            overflowed = True
    lr_scheduler.step()
    return grad_norm, learn_rate, overflowed


def training_batches(accelerator, dataloader, sampler, first_epoch, skip_batches):
    """(epoch, samples) for every batch from where the run stands, epoch after epoch."""
    for epoch in itertools.count(first_epoch):
        batches = accelerator.skip_first_batches(dataloader, skip_batches) if skip_batches else dataloader
        skip_batches = 0
        # accelerate's loader re-sets its batch sampler's epoch from its own counter on every pass: keep them equal.
        batches.set_epoch(epoch)
        sampler.set_epoch(epoch)
        for samples in batches:
            yield epoch, samples


@contextlib.contextmanager
def stop_signals(state):
    """SIGTERM (what SLURM and spot instances send) and Ctrl-C ask the run to finish its step, save and exit; a
    second Ctrl-C ends it at once."""

    def stop(signum, frame):
        state.signals.append(signal.Signals(signum).name)
        if signum == signal.SIGINT:
            logger.warning("stopping after this step and saving; press Ctrl-C again to quit without saving")
            signal.signal(signal.SIGINT, signal.SIG_DFL)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def check_ranks_agree(accelerator, hn):
    """With several processes, confirm that every one ends with bit-identical hypernetwork weights."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import gather_object

    digests = gather_object([weights_digest(hn)])
    if len(set(digests)) == 1:
        logger.info(f"hypernetwork weights identical on all {len(digests)} processes (sha256 {digests[0]})")
    else:
        logger.error(f"hypernetwork weights differ between processes: {digests}; gradients were not synchronised")


def watched(main):
    """main, where a lost process of the run ends this one with one line (hypernet.processes.PeerLost)."""

    def run():
        try:
            return main()
        except RuntimeError:
            processes = Processes.current
            if processes is None:
                raise
            with processes.watched():
                raise

    return run


def main(input_args=None):
    args = parse_args(input_args)
    if not args.verbose:
        quiet_libraries()
    from accelerate.utils import gather_object, set_seed

    # Everything cheap is checked before any model or image is loaded.
    entries = read_entries(args)
    if not entries.streamed:
        data.check_images(entries)
    with flag_errors(path="--template_file"):
        template = data.load_template(args.template_file)
    if args.debug_dataset is not None:
        return debug_dataset(args, entries, template)
    model_widths = attention_widths_from_config(args.model_folder, revision=args.revision)
    set_seed(args.seed)
    hn, resumed_optimizer = make_hypernetwork(args, model_widths)
    unused = unused_widths(hn, model_widths, args.resume_hypernetwork or "--widths")

    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0) > 0:
        raise UsageError(
            "this process is an in-job restart (torchrun --max_restarts), which torch cannot rejoin to a process group "
            "in this version; launch again with --resume_from_checkpoint latest, as the SLURM example requeues"
        )
    accelerator = make_accelerator(args, find_unused_parameters=unused is not None)
    handler = logging.StreamHandler()
    handler.setFormatter(PrintableFormatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(handlers=[handler], level=logging.INFO)
    if not accelerator.is_main_process:
        logger.setLevel(logging.WARNING)
    processes = Processes(accelerator.state)
    with flag_errors(output_dir="--output_dir"):
        check_shared_folder(accelerator.state, args.output_dir, "output_dir")
    # Chosen once, by the main process: every process resumes the same checkpoint, or none does.
    checkpoint = processes.on_main(resolve_checkpoint, args)
    batch = dict(
        zip(runs.BATCH_KEYS, (accelerator.num_processes, args.train_batch_size, args.gradient_accumulation_steps))
    )
    if checkpoint is not None:
        check_global_batch(checkpoint, batch)
    lock = processes.on_main(claim_output_dir, args, checkpoint is not None, share=False)
    if lock is not None:
        atexit.register(lock.close)  # the lock's file goes with the run, however it ends
    repo_id = processes.on_main(create_hub_repo, args) if args.push_to_hub else None
    started_at = time.time()
    if unused:
        logger.warning(unused)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    models = load_models(
        args.model_folder,
        args.revision,
        args.variant,
        weight_dtype,
        args.pretrained_vae_model_name_or_path,
    )
    for encoder in (*models.text_encoders, models.vae):
        encoder.to(accelerator.device)
    if args.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()

    settings = data_settings(args)
    prompt_encoder = hypernet.prompts.PromptEncoder(
        models.tokenizers, models.text_encoders, args.clip_skip, args.text_encoding, args.sdxl_clip_l_skip
    )
    if args.clip_skip > 1 and not prompt_encoder.clip_skip_applies:
        logger.warning(
            f"--clip_skip {args.clip_skip}: the webui ignores Clip skip for SD 2.x and SDXL (but with --sdxl_clip_l_skip), and so does "
            "--text_encoding webui; the last layer is read"
        )
    stored = not args.encode_on_the_fly
    encoders = data.Encoders(
        vae=models.vae,
        prompt_encoder=prompt_encoder,
        device=accelerator.device,
        dtype=models.vae.dtype,
        vae_id=on_main_process(accelerator, vae_weights_id, args) if stored else "",
        text_id=on_main_process(accelerator, text_weights_id, args) if stored else "",
        embedding_dtype=weight_dtype,
    )
    started = time.perf_counter()
    try:
        with flag_errors(**DATA_FLAGS):
            records, damaged = data.prepare_records(
                entries,
                template,
                settings,
                encoders,
                args.cache_dir,
                accelerator.state,
                accelerator.is_local_main_process,
                stored,
            )
    except UsageError as e:
        if str(e) == "the dataset held no images":
            raise UsageError(f"--dataset_name {args.dataset_name}: the stream held no rows") from None
        raise
    # What preparing the records freed goes back to the system; from here on, a step's freed memory is kept.
    release_free_memory()
    apply_retain_setting(args.retain_freed_memory, accelerator.device.type)
    counts = [encoders.vae_calls, encoders.prompt_calls]
    if accelerator.num_processes > 1:
        counts = [sum(c) for c in zip(*gather_object([counts]))]
    if stored:
        logger.info(
            f"record store {args.cache_dir or data.default_store_dir()}: encoded {counts[0]} images and "
            f"{counts[1]} prompts in {time.perf_counter() - started:.2f} s; the rest of the {len(records)} "
            "images' records were stored already"
        )
    if damaged:
        logger.warning(f"{damaged} damaged entries of the record store were encoded again")
    log_image_fit(args, records)
    initial_step = hn.config.step
    # The webui's name and short hash of a checkpoint file; of a folder, its name and its UNet's weights' hash.
    hn.config.sd_checkpoint = on_main_process(accelerator, args.base_model.webui_hash)
    hn.config.sd_checkpoint_name = args.base_model.name
    hn.train()
    hn.requires_grad_(True)
    with warnings.catch_warnings():  # widths the model lacks were logged above, before any model loaded
        warnings.filterwarnings("ignore", message=".*matches no attention layer")
        model = UNetWithHypernetwork(models.unet, hn)
    if args.torch_compile:
        compile_blocks(models.unet, args.torch_compile_mode)
    optimizer, optimizer_name = make_optimizer(
        hn.parameters(), args.optimizer, args.use_8bit_adam, **optimizer_flags(args)
    )
    if resumed_optimizer is not None and resumed_optimizer.name == optimizer_name:
        problem = optimizer_state_problem(resumed_optimizer.state_dict, optimizer, optimizer_name)
        if problem:
            logger.warning(
                f"ignoring optimizer state: {args.resume_hypernetwork}{OPTIM_SUFFIX}: {problem}; training "
                "starts a fresh optimizer state"
            )
        else:
            resume_optimizer_state(optimizer, resumed_optimizer.state_dict)
            logger.info(f"continuing the optimizer state of {args.resume_hypernetwork}")
    resumed_optimizer = None
    lr_scheduler = make_lr_scheduler(
        optimizer, args.lr_schedule, args.lr_scheduler, args.lr_warmup_steps, initial_step, args.max_train_steps
    )

    # Global batches, which accelerate splits across processes: every process count sees the same global batches.
    sampler = data.EpochBatchSampler(
        records.sizes(), args.train_batch_size * accelerator.num_processes, args.seed, records.chunk_counts()
    )
    dataloader = torch.utils.data.DataLoader(
        data.TrainingSamples(records, template, settings, None if stored else entries),
        batch_sampler=sampler,
        collate_fn=data.collate,
        num_workers=args.dataloader_num_workers,
        # Its own generator: a new iterator would otherwise draw from the global RNG that dropout uses, at a point
        # that differs between a resumed run and an uninterrupted one.
        generator=torch.Generator().manual_seed(args.seed),
    )
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
    state = RunState(step=initial_step, losses=deque(maxlen=3 * len(records)), run_id=runs.new_run_id(), batch=batch)
    accelerator.register_save_state_pre_hook(functools.partial(save_state_hook, accelerator, model, state))
    accelerator.register_load_state_pre_hook(functools.partial(load_state_hook, accelerator, model, state))

    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    steps_per_epoch = max(1, math.ceil(len(dataloader) / args.gradient_accumulation_steps))
    if accelerator.is_main_process:
        run_settings = {
            **{
                k: v
                for k, v in vars(args).items()
                if k not in ("lr_schedule", "clip_grad_schedule", "hub_token", "base_model", "model_folder")
            },
            "model_hash": hn.config.sd_checkpoint,
            "dataset_size": len(records),
            "num_processes": accelerator.num_processes,
            "total_batch_size": total_batch_size,
            "optimizer_name": optimizer_name,
            "optimizer_settings": optimizer_settings(optimizer.optimizer),
            "hypernet_version": hypernet.__version__,
        }
        write_json(os.path.join(args.output_dir, "training_settings.json"), run_settings)
        if args.report_to != "none":
            accelerator.init_trackers(
                args.tracker_project_name,
                config={k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in run_settings.items()},
                # W&B's own folder under the run's, unless WANDB_DIR says where
                init_kwargs={
                    "wandb": {
                        "name": args.run_name or args.hypernetwork_name,
                        "dir": os.environ.get("WANDB_DIR", args.output_dir),
                    }
                },
            )

    if checkpoint:
        accelerator.load_state(checkpoint)
        logger.info(f"resumed from {checkpoint} at step {state.step}")
    hn = accelerator.unwrap_model(model).hypernetwork
    csv_path = os.path.join(args.output_dir, "loss.csv")
    loss_rows = runs.read_loss_csv(csv_path, state.step) if accelerator.is_main_process and checkpoint else []
    logger.info(
        f"training {args.hypernetwork_name}: {len(records)} images, widths {hn.widths}, "
        f"{sum(p.numel() for p in hn.parameters()):,} parameters, {accelerator.num_processes} process(es), "
        f"total batch {total_batch_size}, steps {state.step} -> {args.max_train_steps}"
    )
    if args.schedule_end == args.max_train_steps:
        logger.info(
            f"the --learning_rate schedule ends at step {args.schedule_end}: training stops there, as in the webui"
        )

    from tqdm.auto import tqdm

    progress = tqdm(
        total=args.max_train_steps, initial=state.step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    parameters = list(hn.parameters())
    last_good = runs.LastGood(parameters, optimizer.optimizer)
    done = state.step - initial_step
    batches = training_batches(
        accelerator,
        dataloader,
        sampler,
        done // steps_per_epoch,
        (done % steps_per_epoch) * args.gradient_accumulation_steps,
    )
    step_loss, bad_in_step = 0.0, False
    if accelerator.is_main_process and args.preview_every and not os.path.exists(preview_path(args, "base", 0, 0)):
        try:
            log_previews(accelerator, args, models, prompt_encoder, model, hn, state.step, weight_dtype, base=True)
        except HypernetError as e:
            state.failure = e  # raised on every process at the first step's gather
    with stop_signals(state), contextlib.closing(progress):  # closed before an error's line is printed
        for epoch, samples in batches if state.step < args.max_train_steps else ():
            batch = batch_to_device(
                samples, models, prompt_encoder, args.seed, args.noise_offset, accelerator.device, weight_dtype
            )
            with accelerator.accumulate(model):
                loss = diffusion_loss(model, models.noise_scheduler, batch, args.snr_gamma)
                mean_loss = share_loss_and_stop(accelerator, processes, loss, state)
                bad_in_step = bad_in_step or not math.isfinite(mean_loss)
                step_loss += mean_loss / args.gradient_accumulation_steps
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    clip_value = rate_at(args.clip_grad_schedule, state.step)
                    grad_norm, learn_rate, overflowed = optimizer_step(
                        accelerator,
                        optimizer,
                        lr_scheduler,
                        parameters,
                        last_good,
                        bad_in_step,
                        args.clip_grad_mode,
                        clip_value,
                    )
            if not accelerator.sync_gradients:
                continue

            state.step += 1
            processes.reached(state.step)
            progress.update(1)
            if bad_in_step:
                state.bad_steps += 1
                logger.warning(
                    f"step {state.step}: non-finite loss ({step_loss}); step skipped, back to the last good weights"
                )
            elif overflowed:
                state.bad_steps += 1
                logger.warning(
                    f"step {state.step}: the optimizer step made the weights non-finite (loss {step_loss:.4f}, learning "
                    f"rate {learn_rate:.3g}); step undone, back to the last good weights"
                )
            else:
                if not last_good.restored:  # a step on restored weights shows nothing new: the streak goes on
                    state.bad_steps = 0
                state.losses.append(step_loss)
            last_good.restored = bad_in_step or overflowed
            if accelerator.is_main_process:
                epoch_step = (state.step - initial_step - 1) % steps_per_epoch + 1
                loss_rows.append([state.step, epoch, epoch_step, f"{step_loss:.7f}", learn_rate])
                mean = sum(state.losses) / len(state.losses) if state.losses else float("nan")
                progress.set_postfix(loss=f"{mean:.4f}", lr=f"{learn_rate:.2e}", epoch=epoch)
            logs = {"loss": step_loss, "lr": learn_rate}
            if grad_norm is not None:
                logs["grad_norm"] = float(grad_norm)
            accelerator.log(logs, step=state.step)
            step_loss, bad_in_step = 0.0, False

            if state.bad_steps >= args.max_bad_steps:
                state.stop = "bad"
            elif state.stop_asked:
                state.stop = "signal"
            if state.stop or state.step >= args.max_train_steps:
                break
            if accelerator.is_main_process:
                try:
                    periodic_outputs(
                        accelerator,
                        args,
                        models,
                        prompt_encoder,
                        model,
                        hn,
                        state,
                        optimizer,
                        optimizer_name,
                        weight_dtype,
                    )
                    if state.step % 50 == 0:
                        runs.write_loss_csv(csv_path, loss_rows)
                except HypernetError as e:
                    state.failure = e  # raised on every process at the next step's gather
            if args.checkpointing_steps and state.step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, processes, args, state, loss_rows)

    processes.raise_first(state.failure)  # an error of the last step's outputs
    check_ranks_agree(accelerator, hn)
    if (state.stop == "signal" or args.checkpointing_steps) and not os.path.isdir(
        os.path.join(args.output_dir, f"checkpoint-{state.step}")
    ):
        save_checkpoint(accelerator, processes, args, state, loss_rows)  # so that "latest" continues here

    def finish():
        runs.write_loss_csv(csv_path, loss_rows)
        if state.stop is None:  # the last step's periodic files, before the final file, which may still fail
            periodic_outputs(
                accelerator, args, models, prompt_encoder, model, hn, state, optimizer, optimizer_name, weight_dtype
            )
        final = os.path.join(args.output_dir, f"{args.hypernetwork_name}.pt")
        save_hypernetwork(hn, final, state.step, optimizer, optimizer_name)
        run = run_summary(
            args, models, hn, records, state, optimizer_name, total_batch_size, accelerator.mixed_precision, started_at
        )
        if args.save_safetensors:
            path = os.path.join(args.output_dir, "safetensors", f"{args.hypernetwork_name}.safetensors")
            save_hypernetwork(hn, path, state.step, metadata=safetensors_metadata(args, hn, run))
        runs.plot_loss(
            loss_rows, os.path.join(args.output_dir, "loss.png"), f"{args.hypernetwork_name}: loss per step"
        )
        logger.info(f"wrote {final} at step {state.step}")
        style = []
        if args.preview_every and state.stop is None:
            if state.last_preview is None or state.last_preview[0] != state.step:
                generation = log_previews(
                    accelerator, args, models, prompt_encoder, model, hn, state.step, weight_dtype
                )
                state.last_preview = (state.step, generation)
            style = write_run_before_after(args, state.step, entries)
        publish_run(args, hn, final, run, state.last_preview, repo_id)
        print("\n".join(printable(line) for line in run_report(args, final, stored, style)), flush=True)

    processes.on_main(finish, share=False)
    # The processes tear down their process groups together, not one while another's is still connected: a gloo
    # process aborted at exit that way once ("terminate called without an active exception").
    accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.unwrap_model(model).attachment.detach()
    if lock is not None:
        lock.close()
    if state.stop == "bad":
        raise HypernetError(
            f"stopped at step {state.step}: {args.max_bad_steps} bad steps in a row (non-finite loss or weights); the "
            "last good "
            "hypernetwork is saved. Lower --learning_rate, use --clip_grad_mode norm, or try --mixed_precision bf16/no"
        )
    if state.stop == "signal":
        by = state.signals[0] if state.signals else "a signal to another process"
        logger.info(f"stopped by {by} at step {state.step}; continue with --resume_from_checkpoint latest")
    return 0


def cli():
    return run_script(watched(main))


if __name__ == "__main__":
    sys.exit(cli())
