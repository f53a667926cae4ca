"""How close images are to a style: the distance of their colour distribution to the style images'."""

import json
import os
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .files import atomic_write
from .images import infotext_prompt


def _unit_directions():
    """The 13 directions of a cube's axes, face diagonals and body diagonals, as unit vectors."""
    raw = [
        (1, 0, 0),
        (0, 1, 0),
        (0, 0, 1),
        (1, 1, 0),
        (1, -1, 0),
        (1, 0, 1),
        (1, 0, -1),
        (0, 1, 1),
        (0, 1, -1),
        (1, 1, 1),
        (1, 1, -1),
        (1, -1, 1),
        (-1, 1, 1),
    ]
    directions = np.asarray(raw, dtype=np.float64)
    return directions / np.linalg.norm(directions, axis=1, keepdims=True)


DIRECTIONS = _unit_directions()
LEVELS = (np.arange(256) + 0.5) / 256


def colour_quantiles(images):
    """The colour distribution of an image, or of several pooled: 256 quantiles of its pixels' RGB values projected
    on each of 13 directions, shape (256, 13). What colour_distance compares."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    pixels = np.concatenate([np.asarray(im.convert("RGB"), dtype=np.float64).reshape(-1, 3) for im in images])
    return np.quantile(pixels @ DIRECTIONS.T, LEVELS, axis=0)


def colour_distance(image, reference):
    """How far an image's colours are from a style's: the sliced Wasserstein-1 distance between the RGB
    distribution of its pixels and that of the reference images (or their colour_quantiles, to reuse them), in
    0-255 RGB units, the mean over 13 directions of how far each quantile of the projected colours moves. 0 for the
    same colours in the same proportions wherever they lie; 75 between plain gray and the style dataset."""
    ours = colour_quantiles(image)
    theirs = reference if isinstance(reference, np.ndarray) else colour_quantiles(reference)
    return float(np.abs(ours - theirs).mean())


@dataclass(frozen=True)
class Sample:
    """One generated image and what made it: its prompt (without hypernetwork tags), seed and multiplier."""

    prompt: str
    seed: int
    multiplier: float
    image: Image.Image


def read_samples(paths):
    """The Samples of the PNGs at `paths` that carry generation infotext (a Seed); the multiplier is the first
    <hypernet:NAME:M> tag's, 0 where there is none (the base model)."""
    samples = []
    for path in paths:
        with Image.open(path) as image:
            text = image.info.get("parameters", "")
            seed = re.search(r"(?:^|, )Seed: (\d+)", text)
            if seed:
                prompt, hypernetworks = infotext_prompt(text)
                multiplier = hypernetworks[0][1] if hypernetworks else 0.0
                samples.append(Sample(prompt, int(seed.group(1)), multiplier, image.convert("RGB")))
    return samples


def in_captions(prompt, captions):
    """Whether a training caption starts with the prompt's subject, its text before the first comma."""
    subject = prompt.split(",", 1)[0].strip()
    return any(caption.startswith(subject) for caption in captions)


def before_after(samples, reference, captions):
    """A grid of `samples`, a row per prompt: its seeds at each multiplier in turn, each image with its
    colour_distance to `reference` (colour_quantiles of the style's images) under it; and the report of those figures: every
    image's distance and place ("box": left, top, right, bottom in the grid), and the mean distance per multiplier
    of the prompts in and not in the training `captions`."""
    prompts = list(dict.fromkeys(s.prompt for s in samples))
    multipliers = sorted({s.multiplier for s in samples})
    seeds = {p: sorted({s.seed for s in samples if s.prompt == p}) for p in prompts}
    width, height = samples[0].image.size
    scale = 2 if max(width, height) <= 128 else 1  # a small image is shown at twice its size
    cell_w, cell_h, figure, gap, label, header = width * scale, height * scale, 14, 8, 260, 20
    columns = max(len(s) for s in seeds.values())
    section = columns * cell_w + gap
    grid = Image.new("RGB", (label + len(multipliers) * section, header + len(prompts) * (cell_h + figure)), "white")
    draw = ImageDraw.Draw(grid)

    records = []
    for sample in sorted(samples, key=lambda s: (prompts.index(s.prompt), s.multiplier, s.seed)):
        row, column = prompts.index(sample.prompt), seeds[sample.prompt].index(sample.seed)
        left = label + multipliers.index(sample.multiplier) * section + column * cell_w
        top = header + row * (cell_h + figure)
        grid.paste(sample.image.resize((cell_w, cell_h), Image.NEAREST), (left, top))
        distance = colour_distance(sample.image, reference)
        draw.text((left + 2, top + cell_h + 1), f"{distance:.1f}", fill="black")
        records.append(
            dict(
                prompt=sample.prompt,
                seed=sample.seed,
                multiplier=sample.multiplier,
                in_captions=in_captions(sample.prompt, captions),
                style=distance,
                box=[left, top, left + cell_w, top + cell_h],
            )
        )
    means = {}
    for group, wanted in (("in_captions", True), ("not_in_captions", False)):
        for multiplier in multipliers:
            values = [r["style"] for r in records if r["in_captions"] == wanted and r["multiplier"] == multiplier]
            if values:
                means.setdefault(group, {})[f"{multiplier:g}"] = sum(values) / len(values)
    for m, multiplier in enumerate(multipliers):
        values = [r["style"] for r in records if r["multiplier"] == multiplier]
        title = f"multiplier {multiplier:g}: mean distance {sum(values) / len(values):.1f}"
        draw.text((label + m * section + 4, 4), title, fill="black")
    for row, prompt in enumerate(prompts):
        middle = header + row * (cell_h + figure) + cell_h // 2
        draw.text((4, middle - 12), prompt.split(",", 1)[0][:40], fill="black")
        where = "in the captions" if in_captions(prompt, captions) else "not in the captions"
        draw.text((4, middle + 2), f"({where})", fill="gray")
    report = dict(measure=MEASURE, means=means, images=records)
    return grid, report


MEASURE = (
    "colour_distance: sliced Wasserstein-1 distance of the image's RGB distribution to the training images', in 0-255 "
    "RGB units; lower is closer to the style"
)


def write_before_after(path, samples, training):
    """before_after's grid at `path` and its report beside it (.json), each written under a temporary name.
    `training` gives (image, caption) of the training images, each resized to the samples' size as it is read; the
    report also gives their number and their own mean distance to their pooled colours, the floor to read the
    figures against. Returns the report."""
    size = samples[0].image.size
    style_images, captions = [], []
    for image, caption in training:
        style_images.append(image.convert("RGB").resize(size, Image.LANCZOS))
        captions.append(caption)
    reference = colour_quantiles(style_images)
    grid, report = before_after(samples, reference, captions)
    report["training_image_count"] = len(style_images)
    report["training_images"] = sum(colour_distance(image, reference) for image in style_images) / len(style_images)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path) as tmp:
        grid.save(tmp, format="PNG")
    with atomic_write(os.path.splitext(path)[0] + ".json") as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    return report


def summary(report):
    """The report's means as lines to print."""
    lines = [
        "style = colour distance to the training images (lower is closer):",
        f"  each of the {report['training_image_count']} training images:{'':13}{report['training_images']:.1f}",
    ]
    for group, label in (
        ("in_captions", "prompts in the training captions:"),
        ("not_in_captions", "prompts not in the captions:"),
    ):
        if group in report["means"]:
            means = report["means"][group]
            lines.append(f"  {label:<36}" + "   ".join(f"multiplier {m}: {v:.1f}" for m, v in means.items()))
    return lines
