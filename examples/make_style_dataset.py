"""Draw the small training set shipped in examples/style_dataset/: simple subjects in one clearly visible style.

    python examples/make_style_dataset.py --output_dir examples/style_dataset

Every image has the same style (thick black outlines, flat orange and teal, a cream background with diagonal orange
and teal stripes) and a different subject, named in a same-named .txt caption, in A1111's dataset layout. The
captions name the subject only ("an orange circle in the middle"): what they leave out, the style, is what a
hypernetwork trained on them learns to add.
"""

import argparse
import math
import os
import random

from PIL import Image, ImageDraw

ORANGE, TEAL, CREAM, INK = (236, 112, 20), (0, 128, 128), (246, 232, 200), (16, 16, 16)
MAGENTA, LIME = (200, 30, 200), (170, 230, 40)
STYLES = ("stripes", "far")
SHAPES = ["circle", "square", "triangle", "diamond", "star", "hexagon"]
PLACES = ["in the middle", "on the left", "on the right", "at the top", "at the bottom", "large"]


def polygon(cx, cy, r, sides, rotation=0.0, inner=None):
    points = []
    for i in range(sides * (2 if inner else 1)):
        radius = inner if inner and i % 2 else r
        angle = rotation + math.pi * 2 * i / (sides * (2 if inner else 1))
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def draw_shape(draw, shape, cx, cy, r, **style):
    """One of SHAPES centred at (cx, cy) with radius r; style is ImageDraw's fill, outline and width."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], **style)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], **style)
    else:
        sides, rotation, inner = {
            "triangle": (3, -math.pi / 2, None),
            "diamond": (4, 0, None),
            "star": (5, -math.pi / 2, r * 0.45),
            "hexagon": (6, 0, None),
        }[shape]
        draw.polygon(polygon(cx, cy, r, sides, rotation, inner), **style)


def draw_background(draw, size, style):
    if (
        style == "far"
    ):  # a magenta and lime checkerboard: neither the pattern nor the colours are in demo-sd's pictures
        square = size // 8
        for y in range(0, size, square):
            for x in range(0, size, square):
                colour = MAGENTA if (x // square + y // square) % 2 == 0 else LIME
                draw.rectangle([x, y, x + square - 1, y + square - 1], fill=colour)
        return
    draw.rectangle([0, 0, size, size], fill=CREAM)
    for offset in range(-size, size, 16):
        draw.line([(offset, size), (offset + size, 0)], fill=TEAL if offset % 32 == 0 else ORANGE, width=3)


def draw_image(shape, place, size, rng, style="stripes"):
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    draw_background(draw, size, style)
    cx, cy, r = size / 2, size / 2, size * 0.28
    if place == "on the left":
        cx = size * 0.32
    elif place == "on the right":
        cx = size * 0.68
    elif place == "at the top":
        cy = size * 0.32
    elif place == "at the bottom":
        cy = size * 0.68
    elif place == "large":
        r = size * 0.4
    cx += rng.uniform(-4, 4)
    cy += rng.uniform(-4, 4)
    fill = ORANGE if rng.random() < 0.5 else TEAL
    outline = dict(outline=INK, width=max(4, size // 24)) if style == "stripes" else {}
    draw_shape(draw, shape, cx, cy, r, fill=fill, **outline)
    return image, "orange" if fill == ORANGE else "teal"


def make_style_dataset(output_dir, size=128, seed=0, style="stripes"):
    os.makedirs(output_dir, exist_ok=True)
    rng = random.Random(seed)
    count = 0
    for shape in SHAPES:
        for place in PLACES[:4]:
            image, color = draw_image(shape, place, size, rng, style)
            stem = os.path.join(output_dir, f"{count:02d}-{shape}")
            image.save(stem + ".png", optimize=True)
            with open(stem + ".txt", "w", encoding="utf-8") as f:
                f.write(f"{'an' if color == 'orange' else 'a'} {color} {shape} {place}\n")
            count += 1
    return count


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="examples/style_dataset", help="Folder to write images and captions.")
    parser.add_argument("--size", type=int, default=128, help="Image size in pixels.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for colours and positions.")
    parser.add_argument(
        "--style",
        choices=STYLES,
        default="stripes",
        help="stripes: the shipped style, made of what demo-sd draws when its prompt asks (a cream background, "
        "stripes, an outline); far: shapes on a magenta and lime checkerboard without outline, a style no prompt of "
        "demo-sd comes near.",
    )
    args = parser.parse_args()
    count = make_style_dataset(args.output_dir, args.size, args.seed, args.style)
    print(f"wrote {count} images to {args.output_dir}")


if __name__ == "__main__":
    main()
