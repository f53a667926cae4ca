"""Data pipeline at scale: latent caching with 1 and 2 processes, a second run with a warm --cache_dir, and peak
memory as the dataset grows.

    python bench/bench_data.py --images 2000 --resolution 64

On a few thousand small generated images (the tiny model's VAE and text encoder, CPU, gloo), with hypernet.data's
own sharded caching as train_hypernetwork.py runs it:
  caching_seconds  {1, 2} processes encoding the whole dataset (torchrun, one core each; each process encodes its
                   share, then the shares are exchanged)
  warm_start       the same caching again with a warm --cache_dir (no VAE call) against a cold one
  peak_rss_mib     peak resident memory of caching --images and 4x --images (--repeats runs each, 9 by default, a
                   run of each size side by side on one core each; the ratio from the medians), the resident memory
                   after caching, and the records' size: tensors, per-image arrays and captions (tensors_mib: the
                   tensors alone); beyond_records_bytes_per_image: what memory grew by per added image besides its
                   records
Prints one JSON line.
"""

import argparse
import concurrent.futures
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from common import ROOT, machine, process_status
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
    from hypernet.memory import retain_freed_memory

    # In train_hypernetwork.py's order: the folder is scanned and every image checked before the model loads, and
    # --retain_freed_memory (auto: on, on the CPU) applies from there on.
    entries = data.folder_entries(args.data)
    data.check_images(entries)
    state = PartialState(cpu=True)
    retain_freed_memory()
    pipeline = build("tiny", "cpu", torch.float32)
    encoders = data.Encoders(pipeline.vae, [pipeline.tokenizer], [pipeline.text_encoder], "cpu", torch.float32,
                             vae_id="bench")  # fmt: skip
    settings = data.DataSettings(name="bench", resolution=args.resolution, random_flip=True)
    state.wait_for_everyone()
    start = time.perf_counter()
    records, _ = data.prepare_records(entries, ["[filewords]"], settings, encoders, args.cache_dir, state)
    state.wait_for_everyone()
    seconds = time.perf_counter() - start
    if state.is_main_process:
        print(json.dumps({
            "seconds": seconds,
            "vae_calls": encoders.vae_calls,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_mib": process_status("VmRSS") / 2**20,
            "records_mib": records.nbytes / 2**20,
            "tensors_mib": sum(t.nbytes for s in records.stacks for t in s.tensors()) / 2**20,
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
    parser.add_argument("--repeats", type=int, default=9, help="Runs of each size for the peak memory's median.")
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
        # Peak memory moves by a few MiB from run to run (how much of a round's freed working memory is still
        # resident when it peaks): the median of --repeats runs of each size, a small and a large run at a time.
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            runs = [pool.submit(run_worker, folder, 1, args.resolution, port=29700 + i)
                    for i, folder in enumerate([small, large] * args.repeats)]  # fmt: skip
            runs = [run.result() for run in runs]
        smalls, larges = runs[0::2], runs[1::2]
    median = lambda runs, key: statistics.median(run[key] for run in runs)  # noqa: E731
    records_growth = larges[0]["records_mib"] - smalls[0]["records_mib"]
    growth = lambda key: median(larges, key) - median(smalls, key)  # noqa: E731
    beyond_records = lambda key: (growth(key) - records_growth) * 2**20 / (3 * args.images)  # noqa: E731
    sizes = (str(args.images), str(4 * args.images))
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
                "peak_rss_mib": dict(
                    zip(sizes, ([run["peak_rss_mib"] for run in smalls], [run["peak_rss_mib"] for run in larges]))
                ),  # fmt: skip
                "rss_after_mib": dict(zip(sizes, (median(smalls, "rss_after_mib"), median(larges, "rss_after_mib")))),
                "records_mib": dict(zip(sizes, (smalls[0]["records_mib"], larges[0]["records_mib"]))),
                "tensors_mib": dict(zip(sizes, (smalls[0]["tensors_mib"], larges[0]["tensors_mib"]))),
                "peak_rss_growth_over_records_growth": growth("peak_rss_mib") / records_growth,
                "rss_after_growth_over_records_growth": growth("rss_after_mib") / records_growth,
                "beyond_records_bytes_per_image": {
                    "peak": beyond_records("peak_rss_mib"),
                    "after": beyond_records("rss_after_mib"),
                },  # fmt: skip
            }
        )
    )


if __name__ == "__main__":
    main()
