"""A before/after grid of generate.py's images, and how close each multiplier comes to the style.

    python examples/before_after.py quickstart/multiplier-0 quickstart/multiplier-1 \\
        --train_data_dir examples/style_dataset --output quickstart/before-after.png

Reads the PNGs in the folders given, pairs them by the prompt and seed in their infotext, and draws one row per
prompt: its seeds at the first multiplier, then the same seeds at the next. A prompt counts as "in the captions"
where a training caption starts with its first clause (the text before its first comma). The style measure is
the distance of an image's colours to the training images' (hypernet.evaluation.colour_distance, in 0-255 RGB
units; lower is closer), with the training images at the generated images' size. Writes the grid, and beside it
a .json file with every image's measure and the means per multiplier, and prints the means.
"""

import argparse
import json
import os
import re
import sys
from collections import defaultdict

from PIL import Image, ImageDraw

from hypernet.data import IMAGE_EXTENSIONS, read_caption
from hypernet.evaluation import colour_distance, colour_quantiles
from hypernet.files import atomic_write
from hypernet.images import infotext_prompt


def fail(message):
    print(message, file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="Folders of generate.py's PNGs (one per multiplier, or mixed).")
    parser.add_argument("--train_data_dir", required=True, help="The training images and their .txt captions.")
    parser.add_argument("--output", required=True, help="The grid's PNG path; the measures go beside it as .json.")
    return parser.parse_args(argv)


def generated(folder):
    """(prompt, seed, multiplier, image) of each PNG in `folder` that carries generate.py's infotext."""
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".png") or name.startswith("grid-"):
            continue
        image = Image.open(os.path.join(folder, name))
        text = image.info.get("parameters", "")
        seed = re.search(r"(?:^|, )Seed: (\d+)", text)
        if not seed:
            continue
        prompt, hypernetworks = infotext_prompt(text)
        image.load()
        yield prompt, int(seed.group(1)), hypernetworks[0][1] if hypernetworks else 0.0, image


def training_set(folder, size):
    captions, images = [], []
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() in IMAGE_EXTENSIONS:
            images.append(Image.open(os.path.join(folder, name)).convert("RGB").resize(size, Image.LANCZOS))
            caption_path = os.path.join(folder, stem + ".txt")
            if os.path.isfile(caption_path):
                captions.append(read_caption(caption_path))
    return captions, images


def in_captions(prompt, captions):
    subject = prompt.split(",", 1)[0].strip()
    return any(caption.startswith(subject) for caption in captions)


def draw_grid(rows, multipliers, captions):
    """Rows of (prompt, {(multiplier, seed): image}): the row's seeds at each multiplier in turn, each image shown at 2x
    where it is small."""
    first = next(iter(rows[0][1].values()))
    scale = 2 if first.width <= 128 else 1
    cell, gap, label = first.width * scale, 8, 260
    columns = max(len({seed for _, seed in images}) for _, images in rows)
    width = label + len(multipliers) * (columns * cell + gap)
    grid = Image.new("RGB", (width, 20 + len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for s, multiplier in enumerate(multipliers):
        draw.text((label + s * (columns * cell + gap) + 4, 4), f"multiplier {multiplier:g}", fill="black")
    for r, (prompt, images) in enumerate(rows):
        top = 20 + r * cell
        where = "in the captions" if in_captions(prompt, captions) else "not in the captions"
        draw.text((4, top + cell // 2 - 12), prompt.split(",", 1)[0], fill="black")
        draw.text((4, top + cell // 2 + 2), f"({where})", fill="gray")
        seeds = sorted({seed for _, seed in images})
        for s, multiplier in enumerate(multipliers):
            for c, seed in enumerate(seeds):
                image = images.get((multiplier, seed))
                if image is not None:
                    left = label + s * (columns * cell + gap) + c * cell
                    grid.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (left, top))
    return grid


def main(argv=None):
    args = parse_args(argv)
    for folder in args.folders + [args.train_data_dir]:
        if not os.path.isdir(folder):
            fail(f"{folder}: not a folder; give generate.py's --output_dir folders and the training images")

    by_prompt = defaultdict(dict)
    for folder in args.folders:
        for prompt, seed, multiplier, image in generated(folder):
            by_prompt[prompt][multiplier, seed] = image
    if not by_prompt:
        fail(f"{', '.join(args.folders)}: no PNGs with generate.py's infotext (Seed: ...) in them")
    multipliers = sorted({multiplier for images in by_prompt.values() for multiplier, _ in images})
    size = next(iter(next(iter(by_prompt.values())).values())).size
    captions, training_images = training_set(args.train_data_dir, size)
    if not training_images:
        fail(f"--train_data_dir {args.train_data_dir}: no training images to measure the style against")
    style = colour_quantiles(training_images)

    records = []
    for prompt, images in by_prompt.items():
        for (multiplier, seed), image in sorted(images.items()):
            records.append(
                dict(
                    prompt=prompt,
                    seed=seed,
                    multiplier=multiplier,
                    in_captions=in_captions(prompt, captions),
                    style=colour_distance(image, style),
                )
            )
    means = {}
    for group, wanted in (("in_captions", True), ("not_in_captions", False)):
        for multiplier in multipliers:
            values = [r["style"] for r in records if r["in_captions"] == wanted and r["multiplier"] == multiplier]
            if values:
                means.setdefault(group, {})[f"{multiplier:g}"] = sum(values) / len(values)
    training = [colour_distance(image, style) for image in training_images]
    report = dict(
        measure="colour_distance: sliced Wasserstein-1 distance of the image's RGB distribution to the training "
        "images', in 0-255 RGB units; lower is closer to the style",
        training_images=sum(training) / len(training),
        means=means,
        images=records,
    )

    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with atomic_write(args.output) as tmp:
        draw_grid(list(by_prompt.items()), multipliers, captions).save(tmp, format="PNG")
    with atomic_write(os.path.splitext(args.output)[0] + ".json") as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)

    print("style = colour distance to the training images (lower is closer):")
    print(f"  each of the {len(training)} training images:{'':13}{report['training_images']:.1f}")
    for group, label in (
        ("in_captions", "prompts in the training captions:"),
        ("not_in_captions", "prompts not in the captions:"),
    ):
        if group in means:
            print(f"  {label:<36}" + "   ".join(f"multiplier {s}: {v:.1f}" for s, v in means[group].items()))
    print(f"wrote {args.output} and {os.path.splitext(args.output)[0]}.json")
    return report


if __name__ == "__main__":
    main()
