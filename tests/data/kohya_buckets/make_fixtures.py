"""Make the bucket fixtures with kohya's own code (see README.md beside this file).

    python make_fixtures.py --kohya /path/to/sd-scripts

Only numpy is needed: kohya's `BucketManager` (library/train_util.py) and `make_bucket_resolutions`
(library/model_util.py) are taken from its files as they are (by their syntax tree, so that the rest of those
modules, and their imports, are not needed) and run on the image sizes and settings below. fixtures.json gets, for
each, the bucket kohya selects and the size it resizes the image to before cutting it to the bucket.
"""

import argparse
import ast
import json
import math
import os
import random
import types

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

# (training width, height), min_bucket_reso, max_bucket_reso, bucket_reso_steps, bucket_no_upscale
SETTINGS = [
    ((512, 512), 256, 1024, 64, False),
    ((768, 512), 256, 1024, 64, False),
    ((1024, 1024), 512, 2048, 64, False),
    ((512, 512), 256, 1024, 32, False),
    ((512, 512), 256, 1024, 64, True),
    ((1024, 1024), 256, 2048, 64, True),
    ((64, 64), 32, 128, 8, False),
]
IMAGE_SIZES = [(512, 512), (1000, 600), (600, 1000), (1920, 1080), (333, 777), (2048, 512), (640, 448), (64, 96)]


def definition(path, name):
    """The source of the top-level function or class `name` in the file at `path`."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return ast.get_source_segment(source, node)
    raise SystemExit(f"{path} has no {name}")


def kohya_bucket_manager(root):
    model_util = types.ModuleType("model_util")
    model_util.math = math
    exec(definition(os.path.join(root, "library", "model_util.py"), "make_bucket_resolutions"), model_util.__dict__)
    namespace = {"np": np, "math": math, "random": random, "model_util": model_util, "Tuple": tuple}
    exec(definition(os.path.join(root, "library", "train_util.py"), "BucketManager"), namespace)
    return namespace["BucketManager"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kohya", required=True, help="a checkout of kohya-ss/sd-scripts")
    args = parser.parse_args()
    bucket_manager = kohya_bucket_manager(args.kohya)
    cases = []
    for resolution, min_reso, max_reso, steps, no_upscale in SETTINGS:
        manager = bucket_manager(no_upscale, resolution, min_reso, max_reso, steps)
        if not no_upscale:
            manager.make_buckets()
        for width, height in IMAGE_SIZES:
            if no_upscale and min(width, height) < steps:
                continue
            bucket, resized, _ = manager.select_bucket(width, height)
            cases.append(
                {
                    "resolution": list(resolution),
                    "min_bucket_reso": min_reso,
                    "max_bucket_reso": max_reso,
                    "bucket_reso_steps": steps,
                    "bucket_no_upscale": no_upscale,
                    "image_size": [width, height],
                    "bucket": [int(v) for v in bucket],
                    "resized_size": [int(v) for v in resized],
                }
            )
    with open(os.path.join(HERE, "fixtures.json"), "w", encoding="utf-8") as f:
        json.dump({"cases": cases}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
