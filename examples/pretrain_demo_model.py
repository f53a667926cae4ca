"""Train the small Stable Diffusion shipped in examples/demo-sd/ on pictures it draws itself. No download.

    python examples/pretrain_demo_model.py --output_dir examples/demo-sd

The pictures: one flat shape (circle, square, triangle, diamond, star, hexagon) in one of eight colours, at one of
six places, on gray or on another named background, some with diagonal stripes in two colours and some with a bold
black outline, captioned with what they show ("a red star on the left", "a blue circle large, on cream, orange and
teal stripes, bold outline"). Without those words the model draws a flat shape on gray. The model has
the SD 1.x layout (AutoencoderKL, UNet2DConditionModel with cross-attention, a CLIP text encoder and tokenizer, a
DDIM scheduler) at 64x64 pixels and 16x16 latents, and is trained in two stages:

1. the VAE, on those pictures and on random flat graphics (stripes, outlines, backgrounds of any colour), so that
   it can draw more than the UNet is taught;
2. the UNet and the text encoder together, on the pictures' latents, with the epsilon objective of SD 1.x.

The tokenizer is CLIP's BPE with merges that make each word of the captions one token; any other text falls back
to characters, as the tiny models' tokenizer does for everything.
"""

import argparse
import math
import os
import random
import re
import sys
import time

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from make_style_dataset import PLACES, SHAPES, draw_shape
from make_tiny_model import write_tokenizer_files
from PIL import Image, ImageDraw
from transformers import CLIPTextConfig, CLIPTextModel

COLOURS = {
    "red": (210, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 210),
    "yellow": (235, 205, 30),
    "purple": (130, 50, 170),
    "pink": (240, 120, 170),
    "orange": (236, 112, 20),
    "teal": (0, 128, 128),
}
BACKGROUND = (128, 128, 128)
BACKGROUNDS = {"cream": (246, 232, 200), "white": (240, 240, 240), "black": (16, 16, 16), "brown": (110, 70, 40)}
INK = (16, 16, 16)
FRAMINGS = ["", "a picture of ", "a painting of ", "a rendering of ", "a drawing of ", "the painting of "]
# Words of the style dataset's captions and templates, so that they are single tokens too.
EXTRA_WORDS = "bright clean close-up cool cropped dark dirty good large nice small weird rendition art by bold outline stripes on and"
IMAGE_SIZE = 64


def subject_text(shape, colour, place):
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape} {place}"


def random_subject(rng):
    """What one picture shows: a shape, its colour and place, and a background, stripes and outline or None."""
    background = rng.choice(list(BACKGROUNDS)) if rng.random() < 0.4 else None
    stripes = tuple(rng.sample(list(COLOURS), 2)) if rng.random() < 0.3 else None
    outline = rng.random() < 0.3
    return rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(PLACES), background, stripes, outline


def caption_of(shape, colour, place, background, stripes, outline, rng):
    caption = rng.choice(FRAMINGS) + subject_text(shape, colour, place)
    if background:
        caption += f", on {background}"
    if stripes:
        caption += f", {stripes[0]} and {stripes[1]} stripes"
    return caption + (", bold outline" if outline else "")


def draw_scene(shape, colour, place, background, stripes, outline, rng):
    """The picture a subject describes, drawn at twice the size and halved, so that its edges are smooth. Stripes
    and outline are the style dataset's (spacing 16, width 3, outline 5 at 128 pixels)."""
    size = IMAGE_SIZE * 2
    image = Image.new("RGB", (size, size), BACKGROUNDS[background] if background else BACKGROUND)
    draw = ImageDraw.Draw(image)
    if stripes:
        for offset in range(-size, size, 16):
            draw.line([(offset, size), (offset + size, 0)], fill=COLOURS[stripes[offset % 32 != 0]], width=3)
    cx, cy, r = size / 2, size / 2, size * 0.28
    cx, cy, r = {
        "on the left": (size * 0.32, cy, r),
        "on the right": (size * 0.68, cy, r),
        "at the top": (cx, size * 0.32, r),
        "at the bottom": (cx, size * 0.68, r),
        "large": (cx, cy, size * 0.4),
    }.get(place, (cx, cy, r))
    style = dict(outline=INK, width=5) if outline else {}
    draw_shape(draw, shape, cx + rng.uniform(-4, 4), cy + rng.uniform(-4, 4), r, fill=COLOURS[colour], **style)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)


def draw_graphic(rng):
    """Random flat graphics (any background, stripes, outlined shapes), for the VAE only."""
    size = IMAGE_SIZE * 2

    def colour():
        return tuple(rng.randrange(256) for _ in range(3))

    image = Image.new("RGB", (size, size), colour())
    draw = ImageDraw.Draw(image)
    if rng.random() < 0.6:
        step, width, first, second = rng.choice([8, 12, 16, 24]), rng.randint(1, 6), colour(), colour()
        for offset in range(-size, size, step):
            draw.line(
                [(offset, size), (offset + size, 0)], fill=first if offset % (2 * step) == 0 else second, width=width
            )
    for _ in range(rng.randint(1, 2)):
        r = rng.uniform(size * 0.15, size * 0.42)
        outline = dict(outline=colour(), width=rng.randint(2, 8)) if rng.random() < 0.6 else {}
        draw_shape(
            draw,
            rng.choice(SHAPES),
            rng.uniform(r / 2, size - r / 2),
            rng.uniform(r / 2, size - r / 2),
            r,
            fill=colour(),
            **outline,
        )
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)


def to_tensor(images):
    data = torch.tensor(bytearray(b"".join(image.tobytes() for image in images)), dtype=torch.uint8)
    return data.view(len(images), IMAGE_SIZE, IMAGE_SIZE, 3).permute(0, 3, 1, 2).float() / 127.5 - 1


def learn_merges(words):
    """Classic BPE learning on the words alone, until each is one symbol: encoding replays the merges in order."""
    symbols = {word: tuple(word[:-1]) + (word[-1] + "</w>",) for word in words}
    merges = []
    while any(len(s) > 1 for s in symbols.values()):
        counts = {}
        for s in symbols.values():
            for pair in zip(s, s[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        for word, s in symbols.items():
            merged, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    merged.append(s[i] + s[i + 1])
                    i += 2
                else:
                    merged.append(s[i])
                    i += 1
            symbols[word] = tuple(merged)
    return merges


def write_word_tokenizer(directory, text):
    """CLIP's byte-level BPE with merges that make each word of `text` one token."""
    words = sorted(set(re.findall(r"[a-z]+", text.lower())))
    tokenizer = write_tokenizer_files(directory, merges=learn_merges([w for w in words if len(w) > 1]))
    for word in words:
        assert len(tokenizer.tokenize(word)) == 1, f"{word!r} is not one token: {tokenizer.tokenize(word)}"
    return tokenizer


def build_models(tokenizer):
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=64,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 96),
        layers_per_block=1,
        norm_num_groups=16,
        cross_attention_dim=64,
        attention_head_dim=2,  # heads: 16- and 32-wide ones run faster on a CPU than 8 narrow ones
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    return vae, text_encoder, unet


def train_vae(vae, args, rng, log):
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.vae_steps)
    vae.train()
    for step in range(1, args.vae_steps + 1):
        images = [
            draw_graphic(rng) if rng.random() < 0.5 else draw_scene(*random_subject(rng), rng) for _ in range(16)
        ]
        pixels = to_tensor(images)
        posterior = vae.encode(pixels).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(reconstruction, pixels) + 0.5 * F.l1_loss(reconstruction, pixels)
        loss = loss + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == args.vae_steps:
            log(f"vae step {step}/{args.vae_steps} loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_scenes(vae, subjects, rng):
    latents = []
    for start in range(0, len(subjects), 256):
        pixels = to_tensor([draw_scene(*subject, rng) for subject in subjects[start : start + 256]])
        latents.append(vae.encode(pixels).latent_dist.mean)
    return torch.cat(latents)


def train_unet(unet, text_encoder, tokenizer, latents, captions, args, log):
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=1e-2)
    warmup = 200
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps)),
    )
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    unet.train()
    text_encoder.train()
    generator = torch.Generator().manual_seed(args.seed)
    started, running = time.time(), None
    for step in range(1, args.steps + 1):
        index = torch.randint(len(latents), (args.batch_size,), generator=generator)
        batch_ids = ids[index].clone()
        drop = torch.rand(args.batch_size, generator=generator) < args.caption_dropout
        batch_ids[drop] = empty
        noise = torch.randn(latents[index].shape, generator=generator)
        noise = noise + args.noise_offset * torch.randn((*noise.shape[:2], 1, 1), generator=generator)
        timesteps = torch.randint(0, 1000, (args.batch_size,), generator=generator)
        noisy = scheduler.add_noise(latents[index], noise, timesteps)
        context = text_encoder(batch_ids).last_hidden_state
        loss = F.mse_loss(unet(noisy, timesteps, context).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == args.steps:
            log(f"unet step {step}/{args.steps} loss {running:.4f} ({time.time() - started:.0f} s)")
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)


def write_samples(pipeline, path, seed=0):
    prompts = [
        subject_text(shape, colour, place)
        for colour, shape, place in [
            ("red", "circle", "in the middle"),
            ("blue", "square", "on the left"),
            ("yellow", "star", "large"),
            ("green", "triangle", "at the top"),
            ("purple", "hexagon", "on the right"),
            ("pink", "diamond", "at the bottom"),
            ("teal", "star", "in the middle"),
            ("orange", "square", "large"),
        ]
    ]
    images = []
    for prompt in prompts:
        generator = torch.Generator().manual_seed(seed)
        images += pipeline([prompt], num_inference_steps=25, generator=generator, output_type="pil").images
    grid = Image.new("RGB", (IMAGE_SIZE * len(images), IMAGE_SIZE))
    for i, image in enumerate(images):
        grid.paste(image, (IMAGE_SIZE * i, 0))
    grid.save(path)
    return prompts


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="Folder to write the diffusers pipeline to.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the pictures, the weights and the noise.")
    parser.add_argument("--num_images", type=int, default=20000, help="How many captioned pictures to draw.")
    parser.add_argument("--vae_steps", type=int, default=2400, help="Training steps of the VAE (batch 16).")
    parser.add_argument("--vae_learning_rate", type=float, default=1e-3, help="Peak learning rate of the VAE.")
    parser.add_argument("--steps", type=int, default=2600, help="Training steps of the UNet and text encoder.")
    parser.add_argument("--batch_size", type=int, default=32, help="Batch size of the UNet's training.")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="Peak learning rate of the UNet.")
    parser.add_argument(
        "--noise_offset",
        type=float,
        default=0.1,
        help="Noise offset (a random constant per sample and channel, times this, added to the noise). Without it a "
        "16x16 latent keeps its mean colour through the last timestep, and the model takes colour from the noise "
        "instead of the prompt.",
    )
    parser.add_argument(
        "--caption_dropout", type=float, default=0.1, help="Share of empty captions, for classifier-free guidance."
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    started = time.time()

    def log(message):
        print(f"[{time.time() - started:6.0f} s] {message}", flush=True)

    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    words = " ".join(SHAPES + PLACES + list(COLOURS) + list(BACKGROUNDS) + FRAMINGS) + " an " + EXTRA_WORDS
    tokenizer = write_word_tokenizer(os.path.join(args.output_dir, "tokenizer"), words)
    vae, text_encoder, unet = build_models(tokenizer)
    train_vae(vae, args, rng, log)

    subjects = [random_subject(rng) for _ in range(args.num_images)]
    captions = [caption_of(*subject, rng) for subject in subjects]
    latents = encode_scenes(vae, subjects, rng)
    vae.register_to_config(scaling_factor=round(1 / latents.std().item(), 5))
    latents = latents * vae.config.scaling_factor
    log(f"encoded {len(latents)} pictures; latent scaling factor {vae.config.scaling_factor}")

    train_unet(unet, text_encoder, tokenizer, latents, captions, args, log)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    pipeline.save_pretrained(args.output_dir)
    prompts = write_samples(pipeline, os.path.join(args.output_dir, "samples.png"), seed=args.seed)
    minutes = (time.time() - started) / 60
    log(f"wrote {args.output_dir} ({minutes:.1f} min); samples.png shows: " + "; ".join(prompts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
