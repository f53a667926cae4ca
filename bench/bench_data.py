"""Data pipeline at scale: latent caching with 1 and 2 processes, a second run with a warm --cache_dir, and peak
memory as the dataset grows.

    python bench/bench_data.py --images 2000 --resolution 64

On a few thousand small generated images (the tiny model's VAE and text encoder, CPU, gloo), with hypernet.data's
own sharded caching as train_hypernetwork.py runs it:
  caching_seconds  {1, 2} processes encoding the whole dataset (torchrun, one core each; each process encodes its
                   share, then the shares are exchanged)
  warm_start       the same caching again with a warm --cache_dir (no VAE call) against a cold one
  peak_rss_mib     peak resident memory of caching --images and 4x --images, and the cached records' size
Prints one JSON line.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from common import ROOT, machine
from PIL import Image


def make_images(directory, count, resolution, seed=0):
    """`count` small PNGs with captions, each different."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(directory, f"{i:05d}.png"), compress_level=1)
        with open(os.path.join(directory, f"{i:05d}.txt"), "w") as f:
            f.write(f"image {i}, noise, {'warm' if i % 2 else 'cold'}")


def worker(args):
    """Cache the dataset's latents as train_hypernetwork.py does, in this process's share; the main process prints
    seconds, VAE calls, peak memory and the records' size."""
    import torch
    from accelerate import PartialState
    from common import build

    from hypernet import data

    state = PartialState(cpu=True)
    pipeline = build("tiny", "cpu", torch.float32)
    encoders = data.Encoders(pipeline.vae, [pipeline.tokenizer], [pipeline.text_encoder], "cpu", torch.float32,
                             vae_id="bench")  # fmt: skip
    settings = data.DataSettings(name="bench", resolution=args.resolution, random_flip=True)
    entries = data.folder_entries(args.data)
    state.wait_for_everyone()
    start = time.perf_counter()
    records, _ = data.shared_records(entries, ["[filewords]"], settings, encoders, args.cache_dir, state)
    state.wait_for_everyone()
    seconds = time.perf_counter() - start
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for r in records
                for t in (r.mean, r.std, r.flipped_mean, r.flipped_std, r.embedding) if t is not None}  # fmt: skip
    if state.is_main_process:
        print(json.dumps({
            "seconds": seconds,
            "vae_calls": encoders.vae_calls,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "records_mib": sum(storages.values()) / 2**20,
        }))  # fmt: skip


def run_worker(data_dir, processes, resolution, cache_dir=None, port=29651):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
               str(port), os.path.abspath(__file__), "--worker", "--data", data_dir, "--resolution", str(resolution)]  # fmt: skip
    if cache_dir:
        command += ["--cache_dir", cache_dir]
    # One core per process, as each process of a multi-GPU run has a GPU of its own: on this machine's 2 cores a
    # single process would otherwise use both through torch's threads, and 2 processes would share them.
    env = dict(os.environ, ACCELERATE_USE_CPU="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="Images in the dataset (4x for the memory check).")
    parser.add_argument("--resolution", type=int, default=64, help="Image side in pixels.")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--cache_dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    with tempfile.TemporaryDirectory() as tmp:
        small, large = os.path.join(tmp, "small"), os.path.join(tmp, "large")
        make_images(small, args.images, args.resolution)
        make_images(large, 4 * args.images, args.resolution, seed=1)
        one = run_worker(small, 1, args.resolution)
        two = run_worker(small, 2, args.resolution)
        cache = os.path.join(tmp, "cache")
        cold = run_worker(small, 1, args.resolution, cache)
        warm = run_worker(small, 1, args.resolution, cache)
        peak_large = run_worker(large, 1, args.resolution)
    print(
        json.dumps(
            {
                "bench": "data",
                "machine": machine(),
                "images": args.images,
                "resolution": args.resolution,
                "caching_seconds": {"1": one["seconds"], "2": two["seconds"]},
                "caching_2/1": two["seconds"] / one["seconds"],
                "warm_start": {
                    "cold_seconds": cold["seconds"],
                    "warm_seconds": warm["seconds"],
                    "cold_vae_calls": cold["vae_calls"],
                    "warm_vae_calls": warm["vae_calls"],
                },  # fmt: skip
                "peak_rss_mib": {
                    str(args.images): one["peak_rss_mib"],
                    str(4 * args.images): peak_large["peak_rss_mib"],
                },
                "records_mib": {str(args.images): one["records_mib"], str(4 * args.images): peak_large["records_mib"]},
                "rss_growth_over_records_growth": (peak_large["peak_rss_mib"] - one["peak_rss_mib"])
                / (peak_large["records_mib"] - one["records_mib"]),
            }
        )
    )


if __name__ == "__main__":
    main()
