"""How far the style comes with training: hypernetworks and a rank-4 LoRA on the demo model, the same data and steps.

    python bench/bench_style.py --at 0,250,500,1000,2000

Every variant trains on the same batches in one run: the 24 images of examples/style_dataset at 64x64 through
examples/demo-sd's VAE, each with a caption from examples/templates/style_filewords.txt (name "quick-style"),
batch 4, the same noise and timesteps, AdamW (weight decay 0.01), diffusion_loss of hypernet.training. At each step
count in --at, each variant generates the prompts of examples/quickstart_prompts.txt (two whose subject a training
caption names, two with a colour and place none names) with --seeds seeds, 20 DDIM steps, CFG 7, as generate.py
does, and its style is the mean colour distance of those images to the training images
(hypernet.evaluation.colour_distance; lower is closer), for the prompts in and not in the training captions.
Variants:
  linear    the webui's default hypernetwork: layer structure 1,2,1, linear, --learning_rate (the quickstart's)
  relu      the quickstart's: 1,2,1 with relu, the same rate
  lora      peft LoRA rank 4 (alpha 4) on to_q/to_k/to_v/to_out.0, as diffusers' LoRA script trains; the same rate
  lora_1e-4 the same LoRA at diffusers' default learning rate 1e-4
  lora_kv   a rank-4 LoRA on to_k/to_v alone, the projections a hypernetwork feeds; the same rate as the hypernetworks
Prints one JSON line.
"""

import argparse
import copy
import json
import os
import random
import sys
import time

import torch
from common import ROOT, machine
from PIL import Image

import hypernet
from hypernet.data import load_template, make_prompt, pixel_values
from hypernet.evaluation import colour_distance, colour_quantiles, in_captions
from hypernet.images import Generation
from hypernet.prompts import PromptEncoder
from hypernet.training import (
    UNetWithHypernetwork,
    diffusion_loss,
    load_models,
    make_lr_scheduler,
    make_optimizer,
    parse_schedule,
)

DEMO = os.path.join(ROOT, "examples", "demo-sd")
STYLE = os.path.join(ROOT, "examples", "style_dataset")
HYPERNETWORK_RATE = "5e-3"


class LoraUNet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=None):
        return self.unet(noisy_latents, timesteps, encoder_hidden_states).sample


def make_variants(unet, names, learning_rate, hypernetworks=()):
    """The named variants, then a hypernetwork for each (activation, layer structure, rate) of `hypernetworks`,
    named "ACTIVATION STRUCTURE @RATE"."""
    specs = [(name, None) for name in names]
    specs += [(f"{a} {structure} @{rate}", (a, structure, rate)) for a, structure, rate in hypernetworks]
    variants = {}
    for name, spec in specs:
        copied = copy.deepcopy(unet)
        if spec is None and name in ("linear", "relu"):
            spec = (name, "1,2,1", learning_rate)
        if spec is not None:
            activation, structure, rate = spec
            network = hypernet.Hypernetwork(
                hypernet.attention_widths(copied),
                name="quick-style",
                layer_structure=tuple(float(w) for w in structure.split(",")),
                activation_func=activation,
            )
            model, parameters = UNetWithHypernetwork(copied, network), list(network.parameters())
        else:
            from peft import LoraConfig

            targets = ["to_k", "to_v"] if name == "lora_kv" else ["to_k", "to_q", "to_v", "to_out.0"]
            copied.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets))
            parameters = [p for p in copied.parameters() if p.requires_grad]
            model, rate = LoraUNet(copied), "1e-4" if name == "lora_1e-4" else learning_rate
        optimizer, _ = make_optimizer(parameters, weight_decay=1e-2)
        schedule = make_lr_scheduler(optimizer, parse_schedule(rate, "rate"))
        variants[name] = dict(
            unet=copied, model=model.train(), parameters=parameters, optimizer=optimizer, schedule=schedule
        )
    return variants


def training_data(models, encoder, style_dir):
    """Latent mean and std of each style image at 64x64, the embedding of each (image, template line), the
    subjects of the captions and the images' colour quantiles."""
    names = sorted(n for n in os.listdir(style_dir) if n.endswith(".png"))
    images = [Image.open(os.path.join(style_dir, n)).convert("RGB").resize((64, 64), Image.LANCZOS) for n in names]
    with torch.no_grad():
        dist = models.vae.encode(pixel_values(images)).latent_dist
    scaling = models.vae.config.scaling_factor
    templates = load_template(os.path.join(ROOT, "examples", "templates", "style_filewords.txt"))
    prompts, subjects = [], []
    for name in names:
        with open(os.path.join(style_dir, name[:-4] + ".txt")) as f:
            caption = f.read().strip()
        prompts.append([make_prompt(line, caption, "quick-style") for line in templates])
        subjects.append(caption.split(",")[0])
    embeddings = encoder.each([p for per_image in prompts for p in per_image])
    per_image = [[embeddings[i * len(templates) + t][0] for t in range(len(templates))] for i in range(len(names))]
    return dist.mean * scaling, dist.std * scaling, per_image, subjects, colour_quantiles(images)


def batches(mean, std, embeddings, batch_size, seed):
    """Shuffled epochs over the images, each sample with a random template line, latent sample, noise and timestep."""
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    while True:
        order = list(range(len(mean)))
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            index = order[start : start + batch_size]
            latents = mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)
            yield {
                "latents": latents,
                "noise": torch.randn(latents.shape, generator=generator),
                "timesteps": torch.randint(0, 1000, (batch_size,), generator=generator),
                "encoder_hidden_states": torch.stack([rng.choice(embeddings[i]) for i in index]),
            }


def style_of(pipeline, unet, encoder, prompts, seeds, subjects, reference, grid_path=None):
    pipeline.unet = unet
    distances = {"in_captions": [], "not_in_captions": []}
    images = []
    for p, prompt in enumerate(prompts):
        group = "in_captions" if in_captions(prompt, subjects) else "not_in_captions"
        for s in range(seeds):
            generation = Generation(prompt=prompt, steps=20, cfg_scale=7.0, seed=p * seeds + s, width=64, height=64)
            with torch.no_grad():
                (image,) = generation.images(pipeline, encoder, "cpu")
            distances[group].append(colour_distance(image, reference))
            images.append(image)
    if grid_path:
        from diffusers.utils import make_image_grid

        make_image_grid(images, len(prompts), seeds).save(grid_path)
    return {group: round(sum(v) / len(v), 2) for group, v in distances.items()}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--at", default="0,250,500,1000,2000", help="Step counts at which to measure the style.")
    parser.add_argument("--seeds", type=int, default=4, help="Seeds per prompt at each measurement.")
    parser.add_argument("--batch_size", type=int, default=4, help="Training batch size (the quickstart's).")
    parser.add_argument(
        "--learning_rate", default=HYPERNETWORK_RATE, help="Rate (schedule) of every variant but lora_1e-4."
    )
    parser.add_argument("--image_dir", default=None, help="Write each measurement's images there as a grid.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the batches and the initial weights.")
    parser.add_argument(
        "--only", default=None, help="Comma-separated variants to run (default: all, or none with --hypernetwork)."
    )
    parser.add_argument(
        "--hypernetwork",
        nargs=3,
        action="append",
        default=[],
        metavar=("ACTIVATION", "STRUCTURE", "RATE"),
        help="Also a hypernetwork of this activation, layer structure and learning rate (repeatable), e.g. relu "
        "1,4,1 5e-3.",
    )
    parser.add_argument(
        "--style_dir", default=STYLE, help="The style's images and captions (examples/make_style_dataset.py)."
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    at = sorted({int(s) for s in args.at.split(",")})
    names = args.only.split(",") if args.only else ["linear", "relu", "lora", "lora_1e-4", "lora_kv"]
    if args.hypernetwork and not args.only:
        names = []
    torch.manual_seed(args.seed)
    from diffusers import StableDiffusionPipeline

    models = load_models(DEMO)
    pipeline = StableDiffusionPipeline.from_pretrained(DEMO, safety_checker=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    encoder = PromptEncoder(models.tokenizers, models.text_encoders)
    mean, std, embeddings, subjects, reference = training_data(models, encoder, args.style_dir)
    with open(os.path.join(ROOT, "examples", "quickstart_prompts.txt")) as f:
        prompts = [line.strip() for line in f if line.strip()]
    variants = make_variants(models.unet, names, args.learning_rate, args.hypernetwork)
    if args.image_dir:
        os.makedirs(args.image_dir, exist_ok=True)

    started = time.time()
    base_style = style_of(pipeline, models.unet, encoder, prompts, args.seeds, subjects, reference)
    style = {name: {} for name in variants}
    train_seconds = {name: 0.0 for name in variants}
    data = batches(mean, std, embeddings, args.batch_size, args.seed)
    for step in range(at[-1] + 1):
        if step in at:
            for name, variant in variants.items():
                variant["model"].eval()
                grid = os.path.join(args.image_dir, f"{name}-{step}.png") if args.image_dir else None
                style[name][step] = style_of(
                    pipeline, variant["unet"], encoder, prompts, args.seeds, subjects, reference, grid
                )
                variant["model"].train()
        if step == at[-1]:
            break
        batch = next(data)
        for name, variant in variants.items():
            tick = time.perf_counter()
            loss = diffusion_loss(variant["model"], models.noise_scheduler, batch)
            variant["optimizer"].zero_grad(set_to_none=True)
            loss.backward()
            variant["optimizer"].step()
            variant["schedule"].step()
            train_seconds[name] += time.perf_counter() - tick
    trainable = {name: sum(p.numel() for p in v["parameters"]) for name, v in variants.items()}
    print(
        json.dumps(
            dict(
                machine=machine(),
                base_style=base_style,
                style=style,
                trainable_parameters=trainable,
                train_seconds={k: round(v, 1) for k, v in train_seconds.items()},
                seconds=round(time.time() - started, 1),
                prompts=prompts,
                seeds=args.seeds,
            )
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
