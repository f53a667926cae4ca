"""A before/after grid of generate.py's images, and how close each multiplier comes to the style.

    python examples/before_after.py quickstart/multiplier-0 quickstart/multiplier-1 \\
        --train_data_dir examples/style_dataset --output quickstart/before-after.png

Reads the PNGs in the folders given, pairs them by the prompt and seed in their infotext, and draws one row per
prompt: its seeds at the first multiplier, then the same seeds at the next, each image's figure under it. A prompt
counts as "in the captions" where a training caption starts with its first clause (the text before its first comma).
The figure is the distance of an image's colours to the training images' (hypernet.evaluation.colour_distance, in
0-255 RGB units; lower is closer), with the training images at the generated images' size. Writes the grid, and
beside it a .json file with every image's figure and place in the grid and the means per multiplier, and prints the
means. train_hypernetwork.py writes the same grid of its previews as NAME.before-after.png.
"""

import argparse
import os
import sys

from hypernet.data import folder_entries
from hypernet.errors import HypernetError
from hypernet.evaluation import read_samples, summary, write_before_after


def fail(message):
    print(message, file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="Folders of generate.py's PNGs (one per multiplier, or mixed).")
    parser.add_argument("--train_data_dir", required=True, help="The training images and their .txt captions.")
    parser.add_argument("--output", required=True, help="The grid's PNG path; the figures go beside it as .json.")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    for folder in args.folders + [args.train_data_dir]:
        if not os.path.isdir(folder):
            fail(f"{folder}: not a folder; give generate.py's --output_dir folders and the training images")
    paths = [
        os.path.join(folder, name)
        for folder in args.folders
        for name in sorted(os.listdir(folder))
        if name.endswith(".png") and not name.startswith("grid-")
    ]
    samples = read_samples(paths)
    if not samples:
        fail(f"{', '.join(args.folders)}: no PNGs with generate.py's infotext (Seed: ...) in them")
    try:
        training = folder_entries(args.train_data_dir)
    except HypernetError:
        fail(f"--train_data_dir {args.train_data_dir}: no training images to measure the style against")
    report = write_before_after(args.output, samples, training.spread(len(training)))
    print("\n".join(summary(report)))
    print(f"wrote {args.output} and {os.path.splitext(args.output)[0]}.json")
    return report


if __name__ == "__main__":
    main()
