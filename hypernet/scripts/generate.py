#!/usr/bin/env python
"""Text-to-image with hypernetworks stacked at chosen multipliers.

    python generate.py --pretrained_model_name_or_path MODEL --prompt "a castle" \\
        --hypernetwork style.pt:0.8 --hypernetwork detail.safetensors:0.5 --output_dir out

A1111's prompt syntax works too: "<hypernet:style:0.8> a castle" loads style.pt or style.safetensors from
--hypernetwork_dir. Every PNG carries its parameters as A1111 infotext, readable in the webui's PNG Info.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import re
import signal
import sys

import torch

import hypernet
from hypernet.attachment import (
    COMPILE_MODES,
    attention_widths_from_config,
    check_widths,
    compile_blocks,
    unused_widths,
)
from hypernet.errors import HypernetError, UsageError, flag_errors, printable, run_script
from hypernet.files import check_writable_folder
from hypernet.flags import MAX_SEED, SEED, check_flags, check_sampling_steps, parse_flags
from hypernet.formats import DTYPES
from hypernet.images import SAMPLERS, Generation, make_scheduler, sampler_name, save_png
from hypernet.memory import RETAIN_SETTINGS, apply_retain_setting
from hypernet.models import resolve_model
from hypernet.prompts import (
    TEXT_ENCODINGS,
    PromptEncoder,
    check_clip_skip,
    hypernetworks_in,
    parse_emphasis,
    parse_multiplier,
    parse_prompt,
)
from hypernet.publishing import file_hashes
from hypernet.scripts import HelpFormatter
from hypernet.verbosity import quiet_libraries


def stable_diffusion_schedulers():
    """The diffusers scheduler classes compatible with Stable Diffusion's own schedulers (PNDM, DDIM, Euler)."""
    from diffusers.schedulers import KarrasDiffusionSchedulers

    return sorted(member.name for member in KarrasDiffusionSchedulers)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(
        description="Generate images with hypernetworks stacked at chosen multipliers.", formatter_class=HelpFormatter
    )
    model_group = parser.add_argument_group("model")
    model_group.add_argument(
        "--pretrained_model_name_or_path",
        required=True,
        help="The base model: a diffusers folder, a single .safetensors/.ckpt checkpoint of SD 1.x, 2.x or SDXL (its "
        "family is read from the file; converted once into hypernet's cache), or a Hub id.",
    )
    model_group.add_argument(
        "--from_single_file",
        action="store_true",
        help="Insist that the model is one checkpoint file (a file is recognised without it, as diffusers' name).",
    )
    model_group.add_argument(
        "--original_config", default=None, help="The original (LDM) .yaml config of a single-file model."
    )
    model_group.add_argument(
        "--config",
        default=None,
        help="A diffusers folder of the same family whose configs describe a single-file model; needed offline where "
        "that family's configs are not in the Hugging Face cache.",
    )
    model_group.add_argument(
        "--sampler",
        "--scheduler",
        dest="scheduler",
        default=None,
        help=f"The webui's sampler, by the name its PNG Info shows ({', '.join(SAMPLERS)}), or a diffusers "
        f"scheduler class compatible with the model's own; for Stable Diffusion's: "
        f"{', '.join(stable_diffusion_schedulers())}. The images' infotext names it as the webui does. Default: the "
        "model's own.",
    )
    model_group.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="Default: fp16 on CUDA, else fp32.")
    model_group.add_argument("--device", default=None, help="cuda, cpu, mps... Default: cuda when available.")
    model_group.add_argument(
        "--retain_freed_memory",
        default="auto",
        choices=RETAIN_SETTINGS,
        help="Keep the memory a denoising step frees for the next one instead of handing it back to the kernel "
        "(glibc only; the whole process's allocator). auto: on for --device cpu, where it makes steps faster.",
    )

    hypernetwork_group = parser.add_argument_group("hypernetworks")
    hypernetwork_group.add_argument(
        "--hypernetwork",
        action="append",
        default=[],
        metavar="FILE[:MULTIPLIER]",
        help="A .pt/.safetensors hypernetwork and its multiplier (default 1.0); repeat to stack, applied in order.",
    )
    hypernetwork_group.add_argument(
        "--hypernetwork_dir",
        default="models/hypernetworks",
        help="Where <hypernet:NAME:M> in a prompt looks for NAME.pt or NAME.safetensors.",
    )

    prompt_group = parser.add_argument_group("prompts and sampling")
    prompt_group.add_argument("--prompt", action="append", default=[], help="Prompt; repeat for several.")
    prompt_group.add_argument("--prompts_file", default=None, help="A text file with one prompt per line.")
    prompt_group.add_argument("--negative_prompt", default="", help="Negative prompt.")
    prompt_group.add_argument("--num_images", type=int, default=1, help="Images per prompt.")
    prompt_group.add_argument("--batch_size", type=int, default=1, help="Images generated at once.")
    prompt_group.add_argument("--seed", type=int, default=0, help="Seed of the first image; image i uses seed + i.")
    prompt_group.add_argument("--num_inference_steps", type=int, default=20, help="Denoising steps.")
    prompt_group.add_argument(
        "--guidance_scale", type=float, default=7.0, help="Classifier-free guidance (CFG) scale."
    )
    prompt_group.add_argument(
        "--clip_skip",
        type=int,
        default=1,
        help="The webui's Clip skip: 1 reads the text encoder's last layer, 2 the one before. The webui applies it to "
        "SD 1.x only, and so does --text_encoding webui.",
    )
    prompt_group.add_argument(
        "--sdxl_clip_l_skip",
        action="store_true",
        help="The webui's 'Clip skip SDXL' setting: --clip_skip applies to SDXL's CLIP-L encoder too (its hidden "
        "state --clip_skip layers from the end); off, the webui reads CLIP-L's penultimate layer whatever Clip skip.",
    )
    prompt_group.add_argument(
        "--text_encoding",
        default="webui",
        choices=TEXT_ENCODINGS,
        help="webui: prompts as the webui encodes them (any length, (emphasis:1.2), [less], BREAK); diffusers: as "
        "diffusers' pipelines do (plain text cut at 77 tokens).",
    )
    prompt_group.add_argument("--width", type=int, default=None, help="Image width; default: the model's.")
    prompt_group.add_argument("--height", type=int, default=None, help="Image height; default: the model's.")

    output_group = parser.add_argument_group("output")
    output_group.add_argument("--output_dir", required=True, help="Where the PNGs are written.")
    output_group.add_argument(
        "--no_grid", action="store_true", help="Do not write grid-NNNNN.png of all images (NNNNN: the first's number)."
    )
    output_group.add_argument("--no_progress", action="store_true", help="Hide the progress bars.")
    output_group.add_argument(
        "--verbose",
        action="store_true",
        help="Show what the libraries hypernet runs on say (their warnings, deprecation notices and loading bars); "
        "by default they report errors only.",
    )
    hypernetwork_group.add_argument(
        "--no_merge",
        action="store_true",
        help="Run linear hypernetworks' modules in every layer and step instead of merging them into the "
        "attention projections once (the same images up to float rounding; merged is faster).",
    )
    hypernetwork_group.add_argument(
        "--torch_compile",
        action="store_true",
        help="Compile the UNet's repeated transformer blocks, hypernetwork wrappers inside, with torch.compile "
        "(regional compilation): the first image pays the compilation, the rest run faster on a GPU.",
    )
    hypernetwork_group.add_argument(
        "--torch_compile_mode",
        default="default",
        choices=COMPILE_MODES,
        help="torch.compile's mode: reduce-overhead uses CUDA graphs, max-autotune searches for faster kernels.",
    )

    args = parse_flags(parser, input_args)
    validate_args(args)
    return args


def parse_hypernetwork_flag(value):
    """'FILE[:MULTIPLIER]' -> (path, multiplier): the whole value where it is a file (a name may hold ':'), else
    the part before the last ':'."""
    if os.path.isfile(value):
        return value, 1.0
    path, sep, tail = value.rpartition(":")
    if not sep or re.fullmatch(r"[A-Za-z]", path) or tail.startswith(("\\", "/")):
        raise UsageError(f"--hypernetwork {value!r}: no such file")
    if not path:
        raise UsageError(f"--hypernetwork {value!r}: give a file, as in FILE or FILE:0.8")
    multiplier = parse_multiplier(tail, f"--hypernetwork {value!r}", "FILE:0.8")
    if not os.path.isfile(path):
        raise UsageError(f"--hypernetwork {value!r}: no such file {path}")
    return path, multiplier


def read_prompts_file(path):
    """One prompt a line, each with where it came from: [(prompt, '--prompts_file PATH line N')]. UTF-8 or UTF-16
    with a BOM, as captions are read."""
    from hypernet.data import read_text

    with flag_errors(path="--prompts_file"):
        lines = read_text(path, "path").splitlines()
    return [(line.strip(), f"--prompts_file {path} line {n}") for n, line in enumerate(lines, 1) if line.strip()]


@contextlib.contextmanager
def prompt_source(source):
    """An error about a prompt from a file names the file and line first."""
    try:
        yield
    except UsageError as e:
        if source is None:
            raise
        raise UsageError(f"{source}: {e}") from None


def check_device(name):
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {name!r}: not a device; use cpu, cuda, cuda:1, mps") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UsageError(f"--device {name}: no such CUDA device here; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise UsageError(f"--device {name}: hypernet runs on cpu, cuda or mps")


def validate_args(args):
    """Every flag checked before the model loads."""
    args.prompt_sources = [None] * len(args.prompt)
    if args.prompts_file:
        from_file = read_prompts_file(args.prompts_file)
        args.prompt += [prompt for prompt, _ in from_file]
        args.prompt_sources += [source for _, source in from_file]
    if not args.prompt:
        raise UsageError("give a --prompt or a --prompts_file")
    check_flags(args)
    last_seed = args.seed + len(args.prompt) * args.num_images - 1
    if last_seed > MAX_SEED:
        raise UsageError(f"--seed {args.seed}: the last image's seed, {last_seed}, {SEED.describe()}")
    if args.device is not None:
        check_device(args.device)
    model_path = args.pretrained_model_name_or_path
    if args.from_single_file and not os.path.isfile(model_path):
        raise UsageError(f"--pretrained_model_name_or_path {model_path}: no such checkpoint file (--from_single_file)")
    args.hypernetwork = [parse_hypernetwork_flag(value) for value in args.hypernetwork]
    available = hypernetworks_in(args.hypernetwork_dir)
    args.jobs = []
    for prompt, source in zip(args.prompt, args.prompt_sources):
        with prompt_source(source):
            args.jobs.append(parse_prompt(prompt, args.hypernetwork_dir, available))
            parse_emphasis(args.jobs[-1][0])  # a weight no one means, refused before the model loads
    parse_emphasis(args.negative_prompt)
    if args.torch_compile_mode != "default" and not args.torch_compile:
        raise UsageError(
            f"--torch_compile_mode {args.torch_compile_mode} is for --torch_compile; add it or leave it out"
        )
    with flag_errors(path="--output_dir"):
        check_writable_folder(args.output_dir)
    with flag_errors(path="--pretrained_model_name_or_path", config="--config", original_config="--original_config"):
        args.base_model = resolve_model(model_path, args.config, args.original_config)
    args.model_folder = args.base_model.folder
    with flag_errors(clip_skip="--clip_skip"):
        check_clip_skip(args.clip_skip, args.model_folder)
    check_scheduler_flags(args)


def model_scheduler(args):
    """The model's own scheduler, made from its config alone (no weights)."""
    import diffusers

    path = os.path.join(args.model_folder, "scheduler", "scheduler_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        return getattr(diffusers, config["_class_name"]).from_config(config)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"{path}: not a readable diffusers scheduler config ({e})") from None


def check_scheduler_flags(args):
    """--scheduler names a sampler this model can use, and --num_inference_steps fits its scheduler's timesteps."""
    scheduler = model_scheduler(args)
    check_sampling_steps("--num_inference_steps", args.num_inference_steps, scheduler.config.num_train_timesteps)
    if args.scheduler in SAMPLERS:
        with flag_errors(sampler="--sampler"):
            make_scheduler(args.scheduler, scheduler.config)  # a package it needs is missing: said before loading
    if args.scheduler is None or args.scheduler in SAMPLERS:
        return
    compatible = sorted(cls.__name__ for cls in scheduler.compatibles)
    if args.scheduler not in compatible:
        raise UsageError(
            f"--scheduler {args.scheduler!r}: not a sampler for this model; use a webui name "
            f"({', '.join(SAMPLERS)}) or one of {', '.join(compatible)}"
        )


def load_hypernetworks(args):
    """Every file named by a flag or a prompt, loaded once, checked against the model's widths."""
    loaded = {}
    for path, _ in args.hypernetwork + [hn for _, found in args.jobs for hn in found]:
        if path not in loaded:
            loaded[path] = hypernet.load(path)
    check_all_widths(loaded, attention_widths_from_config(args.model_folder))
    return loaded


def check_all_widths(hypernetworks, widths, warn=False):
    """Refuse a file none of whose widths the model uses; with `warn`, say of each that some of its widths it does not."""
    for path, hn in hypernetworks.items():
        try:
            check_widths(hn, widths, path)
        except HypernetError as e:
            raise UsageError(str(e)) from None
        message = unused_widths(hn, widths, path)
        if message and warn:
            print(f"warning: {printable(message)}", file=sys.stderr)


def grid_name(first):
    """The grid of a run whose first image is number `first`: named by it, so that no run replaces another's."""
    return f"grid-{first:05d}.png"


def next_image_number(output_dir):
    """The number of the next image in a folder, after the ones already there, as the webui numbers them."""
    if not os.path.isdir(output_dir):
        return 0
    numbers = [int(m.group(1)) for n in os.listdir(output_dir) if (m := re.match(r"(\d{5,})-", n))]
    return max(numbers, default=-1) + 1


def load_pipeline(args, dtype, device):
    import diffusers

    common = dict(torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
    with open(os.path.join(args.model_folder, "model_index.json")) as f:
        if "XL" in json.load(f)["_class_name"]:
            common.pop("safety_checker"), common.pop("requires_safety_checker")
    pipeline = diffusers.DiffusionPipeline.from_pretrained(args.model_folder, **common)
    if args.scheduler:
        pipeline.scheduler = make_scheduler(args.scheduler, pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=args.no_progress)
    return pipeline.to(device)


def prompt_encoder(pipeline, args):
    """The pipeline's tokenizers and text encoders, encoding prompts as --text_encoding and --clip_skip say."""
    tokenizers = [t for t in (pipeline.tokenizer, getattr(pipeline, "tokenizer_2", None)) if t is not None]
    encoders = [e for e in (pipeline.text_encoder, getattr(pipeline, "text_encoder_2", None)) if e is not None]
    encoder = PromptEncoder(tokenizers, encoders, args.clip_skip, args.text_encoding, args.sdxl_clip_l_skip)
    if args.clip_skip > 1 and not encoder.clip_skip_applies:
        print(
            f"--clip_skip {args.clip_skip}: the webui ignores Clip skip for SD 2.x and SDXL (but with --sdxl_clip_l_skip), and so does "
            "--text_encoding webui; the last layer is read",
            file=sys.stderr,
        )
    return encoder


def stacked(hypernetworks, stack):
    """The loaded hypernetworks for a stack of (path, multiplier), as the webui's load_hypernetworks applies a stack of
    files it has loaded: one object a file, in the stack as often as it is named, at the multiplier it was named with
    last. One copy of the weights, however often a prompt repeats a tag."""
    for path, multiplier in stack:
        hypernetworks[path].set_multiplier(multiplier)
    return [hypernetworks[path] for path, _ in stack]


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, as Ctrl-C raises KeyboardInterrupt."""


def raise_terminated(signum, frame):
    raise Terminated()


def main(input_args=None):
    args = parse_args(input_args)
    if not args.verbose:
        quiet_libraries()
    written = []
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        return generate(args, written)
    except KeyboardInterrupt as e:  # every PNG is written whole or not at all (save_png): say how many there are
        stopped = "stopped by SIGTERM" if isinstance(e, Terminated) else "interrupted"
        print(
            printable(f"generate.py: {stopped}: wrote {len(written)} image(s) to {args.output_dir}"), file=sys.stderr
        )
        return 143 if isinstance(e, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def generate(args, written):
    """Every prompt's images, each appended to `written` once it is on disk; the grid of them all."""
    hypernetworks = load_hypernetworks(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    apply_retain_setting(args.retain_freed_memory, device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    pipeline = load_pipeline(args, dtype, device)
    for hn in hypernetworks.values():
        hn.to(device)
    # Every warning once, with the widths in the order the loaded model's layers hold them.
    check_all_widths(hypernetworks, hypernet.attention_widths(pipeline.unet), warn=True)
    attachment = hypernet.attach(pipeline.unet, [])
    if args.torch_compile:
        compile_blocks(pipeline.unet, args.torch_compile_mode)
    encoder = prompt_encoder(pipeline, args)
    for (prompt, _), source in [*zip(args.jobs, args.prompt_sources), ((args.negative_prompt, None), None)]:
        with prompt_source(source):
            encoder.chunks(prompt)  # every prompt's length checked before the first image
    short_hashes = {path: file_hashes(path)["webui"] for path in hypernetworks}
    model_hash = args.base_model.webui_hash()
    model_name = args.base_model.name
    width = args.width or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    height = args.height or pipeline.unet.config.sample_size * pipeline.vae_scale_factor

    from tqdm.auto import tqdm

    images = []
    progress = tqdm(total=len(args.jobs) * args.num_images, desc="Images", disable=args.no_progress)
    index = first = next_image_number(args.output_dir)
    seed = args.seed
    for prompt, prompt_hypernetworks in args.jobs:
        stack = args.hypernetwork + prompt_hypernetworks
        attachment.hypernetworks[:] = stacked(hypernetworks, stack)
        if not args.no_merge:
            attachment.merge()  # once for the prompt's images
        names = [(os.path.splitext(os.path.basename(path))[0], m, short_hashes[path]) for path, m in stack]
        for start in range(0, args.num_images, args.batch_size):
            count = min(args.batch_size, args.num_images - start)
            generation = Generation(
                prompt=prompt,
                negative_prompt=args.negative_prompt,
                steps=args.num_inference_steps,
                sampler=sampler_name(pipeline.scheduler),
                cfg_scale=args.guidance_scale,
                seed=seed,
                width=width,
                height=height,
                model_hash=model_hash,
                model=model_name,
                hypernetworks=names,
                clip_skip=args.clip_skip if encoder.clip_skip_applies else 1,
            )
            batch = generation.images(pipeline, encoder, device, count)
            for i, image in enumerate(batch):
                one = dataclasses.replace(generation, seed=seed + i)
                path = os.path.join(args.output_dir, f"{index:05d}-{one.seed}.png")
                save_png(image, path, one.infotext())
                written.append(path)
                images.append(image)
                index += 1
                progress.update(1)
            seed += count
    progress.close()
    attachment.detach()
    if not args.no_grid and len(images) > 1:
        from diffusers.utils import make_image_grid

        columns = min(len(images), args.num_images if args.num_images > 1 else len(images))
        rows = -(-len(images) // columns)
        images += [images[0].copy().point(lambda _: 0)] * (rows * columns - len(images))
        save_png(make_image_grid(images, rows, columns), os.path.join(args.output_dir, grid_name(first)))
    print(printable(f"wrote {len(written)} image(s) to {args.output_dir}"))
    return written


def cli():
    return run_script(main)


if __name__ == "__main__":
    sys.exit(cli())
