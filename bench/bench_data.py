"""The record store at scale: held memory as the dataset grows, with 1 and 2 processes on one node; a run under a
memory limit below its records' size; caching with 1 and 2 processes and with a warm store; a training step's time
from the store, from records held in memory, and encoding at every step.

    python bench/bench_data.py --images 2000 --large 16000 --resolution 64

On generated noise images with distinct captions (the tiny model's VAE and text encoder, CPU, gloo), running
train_hypernetwork.py itself under torchrun, one core a process:
  held_mib          the most memory the run's process tree (the launcher, the training processes, their DataLoader
                    workers) held that cannot be paged out (RssAnon + RssShmem, polled every 0.1 s; a page a worker
                    shares with its parent counts twice), for --images and --large images, with 1 and 2 processes;
                    held_proportional_mib: the same with each shared page counted once (Pss_Anon + Pss_Shmem);
                    store_mib: the size of the records it trained on (a caption of about 100 tokens an image)
  memory_limit      the --large run again in a memory cgroup whose limit is below its records' size (where this
                    machine lets root make one): whether it finished, the limit and the records' size
  caching_seconds   encoding --images records with 1 and 2 processes, and again with a warm store (no VAE call)
  step_ms           a training step (batch 4) with its batch read from the store, from the same records held in
                    memory, and encoded at every step (--encode_on_the_fly), side by side in rounds (medians)
Prints one JSON line.
"""

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from common import ROOT, machine
from PIL import Image

from hypernet.memory import held_memory

TAGS = ("stripes", "dots", "outline", "teal", "orange", "grain", "blur", "glow", "flat", "ink", "wash", "chalk")


def make_images(directory, count, resolution, seed=0):
    """`count` noise PNGs, each with a caption of its own (so that each image has a text embedding of its own)."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(directory, f"{i:05d}.png"), compress_level=1)
        with open(os.path.join(directory, f"{i:05d}.txt"), "w") as f:  # about 100 tokens: a context of 2 chunks
            f.write(
                f"image {i}, noise, {'warm' if i % 2 else 'cold'}, "
                + ", ".join(TAGS[(i + k) % len(TAGS)] for k in range(10))
            )


def folder_mib(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 2**20


def train_command(model, data, out, store, processes, port, steps, resolution, extra=()):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_port",
        str(port),
        os.path.join(ROOT, "train_hypernetwork.py"),
        "--pretrained_model_name_or_path",
        model,
        "--train_data_dir",
        data,
        "--output_dir",
        out,
        "--cache_dir",
        store,
        "--resolution",
        str(resolution),
        "--max_train_steps",
        str(steps),
        "--train_batch_size",
        "4",
        "--dataloader_num_workers",
        "1",
        "--save_every",
        "0",
        "--checkpointing_steps",
        "0",
        "--preview_every",
        "0",
        *extra,
    ]


def run_polled(command, cgroup=None):
    """Run a command, polling its process tree's held memory; (peak held bytes, seconds, completed process)."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    if cgroup:  # the process enters the cgroup before it starts Python
        command = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *command]
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, done = [0, 0], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], held_memory(process.pid) or 0)
            peak[1] = max(peak[1], held_memory(process.pid, proportional=True) or 0)
            time.sleep(0.1)

    poller = threading.Thread(target=poll)
    poller.start()
    stdout, stderr = process.communicate()
    done.set()
    poller.join()
    return peak, time.perf_counter() - start, subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def encoding_report(stderr):
    """(images encoded, prompts encoded, seconds) from the run's log line about its record store."""
    found = re.findall(r"encoded (\d+) images and (\d+) prompts in ([\d.]+) s", stderr)
    if not found:
        raise SystemExit(f"no record store line in the run's log:\n{stderr[-3000:]}")
    images, prompts, seconds = found[-1]
    return int(images), int(prompts), float(seconds)


@contextlib.contextmanager
def memory_cgroup(limit):
    """A cgroup (v1 or v2) whose memory limit is `limit` bytes, or None where this machine does not allow one."""
    path = None
    for root, limit_file in (("/sys/fs/cgroup/memory", "memory.limit_in_bytes"), ("/sys/fs/cgroup", "memory.max")):
        candidate = os.path.join(root, f"hypernet-bench-{os.getpid()}")
        try:
            os.mkdir(candidate)
        except OSError:
            continue
        try:
            with open(os.path.join(candidate, limit_file), "w") as f:
                f.write(str(limit))
            path = candidate
            break
        except OSError:
            os.rmdir(candidate)
    try:
        yield path
    finally:
        if path:
            with contextlib.suppress(OSError):
                os.rmdir(path)


def step_times(args):
    """Seconds per training step (median of rounds) with batches read from the store, from the same records held in
    memory, and encoded at every step, in one process: each round runs every variant's steps in turn."""
    import torch
    from accelerate.utils import set_seed

    from hypernet import Hypernetwork, data, training
    from hypernet.attachment import attention_widths_from_config
    from hypernet.memory import retain_freed_memory
    from hypernet.prompts import PromptEncoder

    torch.set_num_threads(1)
    retain_freed_memory()
    models = training.load_models(args.model)
    prompt_encoder = PromptEncoder(models.tokenizers, models.text_encoders)
    encoders = data.Encoders(models.vae, prompt_encoder, "cpu", torch.float32, vae_id="bench", text_id="bench")
    settings = data.DataSettings(name="bench", resolution=args.resolution)
    entries = data.folder_entries(args.data)
    stored, _ = data.prepare_records(entries, ["[filewords]"], settings, encoders, args.store)
    unstored, _ = data.prepare_records(entries, ["[filewords]"], settings, encoders, args.store, encode_latents=False)
    variants = {
        "store": data.TrainingSamples(stored, ["[filewords]"], settings),
        "memory": data.TrainingSamples(
            data.Records(stored.store, stored.folder, in_memory=True), ["[filewords]"], settings
        ),
        "on_the_fly": data.TrainingSamples(unstored, ["[filewords]"], settings, entries),
    }
    set_seed(0)
    hn = Hypernetwork(attention_widths_from_config(args.model)).train()
    model = training.UNetWithHypernetwork(models.unet, hn)
    optimizer, _ = training.make_optimizer(hn.parameters())
    sampler = data.EpochBatchSampler(stored.sizes(), 4, 0, stored.chunk_counts())
    batches = []
    while len(batches) < (args.rounds + 1) * args.steps:
        sampler.set_epoch(len(batches))
        batches += sampler.batches()
    times = {name: [] for name in variants}
    position = 0
    for round_ in range(args.rounds + 1):  # the first round warms up; each round starts at the next variant
        names = list(variants)[round_ % len(variants) :] + list(variants)[: round_ % len(variants)]
        for name, samples in ((n, variants[n]) for n in names):
            start = time.perf_counter()
            for keys in batches[position : position + args.steps]:
                batch = training.batch_to_device(
                    samples.__getitems__(keys), models, prompt_encoder, 0, 0.0, "cpu", torch.float32
                )
                loss = training.diffusion_loss(model, models.noise_scheduler, batch)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            times[name].append((time.perf_counter() - start) / args.steps)
        position += args.steps
    print(json.dumps({name: statistics.median(t[1:]) * 1000 for name, t in times.items()}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="Images of the small dataset.")
    parser.add_argument("--large", type=int, default=16000, help="Images of the large dataset.")
    parser.add_argument("--resolution", type=int, default=64, help="Image side in pixels.")
    parser.add_argument("--train_steps", type=int, default=50, help="Training steps of each memory run.")
    parser.add_argument("--steps", type=int, default=20, help="Steps of each variant in a step-time round.")
    parser.add_argument("--rounds", type=int, default=5, help="Step-time rounds after the warm-up round.")
    parser.add_argument("--step_times", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step_times:
        return step_times(args)

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from make_tiny_model import make_tiny_model

    tmp = tempfile.mkdtemp(prefix="hypernet-bench-data-")
    try:
        model = os.path.join(tmp, "model")
        make_tiny_model(model, "tiny")
        sizes = {"small": args.images, "large": args.large}
        folders = {name: os.path.join(tmp, name) for name in sizes}
        for name, count in sizes.items():
            make_images(folders[name], count, args.resolution, seed=len(name))
        port = iter(range(29700, 29800))
        held, proportional, store_mib, caching = {}, {}, {}, {}
        for name in ("small", "large"):
            for processes in (1, 2):
                store = os.path.join(tmp, f"store-{name}-{processes}")
                command = train_command(
                    model,
                    folders[name],
                    os.path.join(tmp, f"out-{name}-{processes}"),
                    store,
                    processes,
                    next(port),
                    args.train_steps,
                    args.resolution,
                )
                peak, _, result = run_polled(command)
                if result.returncode:
                    raise SystemExit(result.stderr[-3000:])
                held[f"{sizes[name]}x{processes}"] = peak[0] / 2**20
                proportional[f"{sizes[name]}x{processes}"] = peak[1] / 2**20
                store_mib[str(sizes[name])] = folder_mib(store)
                if name == "small":
                    caching[str(processes)] = encoding_report(result.stderr)[2]
        warm_command = train_command(
            model,
            folders["small"],
            os.path.join(tmp, "out-warm"),
            os.path.join(tmp, "store-small-1"),
            1,
            next(port),
            1,
            args.resolution,
        )
        _, _, warm = run_polled(warm_command)
        caching["warm"] = encoding_report(warm.stderr)[2]

        # The limit: below the records' size, and a third above the memory the process needs besides them (its
        # proportional share, so that the worker's pages shared with its parent count once, as a cgroup counts them).
        records = store_mib[str(args.large)]
        small_1 = held[f"{args.images}x1"]
        limit = int(max(0.5 * records, 1.33 * proportional[f"{args.images}x1"]) * 2**20)
        with memory_cgroup(limit) as cgroup:
            if limit >= records * 2**20:
                limited = {"skipped": f"the records ({records:.0f} MiB) are smaller than the process needs"}
            elif cgroup:
                command = train_command(
                    model,
                    folders["large"],
                    os.path.join(tmp, "out-limited"),
                    os.path.join(tmp, "store-limited"),
                    1,
                    next(port),
                    args.train_steps,
                    args.resolution,
                )
                _, seconds, result = run_polled(command, cgroup)
                limited = {
                    "limit_mib": limit / 2**20,
                    "records_mib": records,
                    "finished": result.returncode == 0,
                    "seconds": seconds,
                }
            else:
                limited = {"skipped": "no memory cgroup can be made here"}

        step = subprocess.run(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--step_times",
                "--model",
                model,
                "--data",
                folders["small"],
                "--store",
                os.path.join(tmp, "store-small-1"),
                "--resolution",
                str(args.resolution),
                "--steps",
                str(args.steps),
                "--rounds",
                str(args.rounds),
            ],
            env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"),
            capture_output=True,
            text=True,
        )
        if step.returncode:
            raise SystemExit(step.stderr[-3000:])
        step_ms = json.loads(step.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        json.dumps(
            {
                "bench": "data",
                "machine": machine(),
                "images": args.images,
                "large": args.large,
                "resolution": args.resolution,
                "held_mib": held,
                "held_proportional_mib": proportional,
                "store_mib": store_mib,
                "held_growth_1_process_mib": held[f"{args.large}x1"] - small_1,
                "held_2_processes_over_twice_1_mib": held[f"{args.large}x2"] - 2 * small_1,
                "memory_limit": limited,
                "caching_seconds": caching,
                "warm_encoded": encoding_report(warm.stderr)[:2],
                "step_ms": step_ms,
                "store/memory": step_ms["store"] / step_ms["memory"],
                "on_the_fly/store": step_ms["on_the_fly"] / step_ms["store"],
            }
        )
    )


if __name__ == "__main__":
    main()
