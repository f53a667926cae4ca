"""Shared pieces of the benchmarks: model building, timing, peak memory."""

import os
import random
import resource
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "examples")]

from hypernet.memory import release_free_memory  # noqa: E402

# The benches' architecture names -> examples/make_tiny_model.py's presets.
PRESETS = {"sd15": "sd15", "sdxl": "sdxl_full", "tiny": "tiny", "tiny_sdxl": "sdxl"}


def build(preset, device, dtype):
    from make_tiny_model import build_pipeline

    pipeline = build_pipeline(PRESETS[preset])
    pipeline.set_progress_bar_config(disable=True)
    for model in (pipeline.unet, pipeline.vae, pipeline.text_encoder, getattr(pipeline, "text_encoder_2", None)):
        if model is None:
            continue
        model.requires_grad_(False)
        model.eval()
    return pipeline.to(device, dtype)


def build_unet(preset, device, dtype):
    """The architecture's frozen UNet, its scheduler and its VAE's scale factor, without the text encoders and VAE
    (SDXL's would not fit in 24 GiB beside its UNet and a training step)."""
    from types import SimpleNamespace

    from make_tiny_model import PRESETS as MODEL_PRESETS
    from make_tiny_model import build_unet as build

    unet, scheduler = build(PRESETS[preset])
    unet.requires_grad_(False)
    unet.eval()
    scale = 2 ** (len(MODEL_PRESETS[PRESETS[preset]]["vae"]["block_out_channels"]) - 1)
    return SimpleNamespace(unet=unet.to(device, dtype), scheduler=scheduler, vae_scale_factor=scale)


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(device, fn):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


class PeakMemory:
    """Peak memory of a block above what was in use when it started: CUDA allocator stats on a GPU, else the
    process's peak resident set (VmHWM, reset through /proc/self/clear_refs)."""

    def __init__(self, device):
        self.device = str(device)
        self.peak_above_start = 0
        self.peak_total = 0

    def __enter__(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            release_free_memory()  # else memory freed earlier but still resident hides the block's own growth
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.start = process_status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak_total = torch.cuda.max_memory_allocated()
        else:
            self.peak_total = process_status("VmHWM")
        self.peak_above_start = self.peak_total - self.start


def process_status(field):
    """A memory figure of this process from /proc/self/status (Linux), in bytes; 0 where it has none."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class PageFaults:
    """Minor page faults the process took during a block: memory the kernel had to map (and zero) again."""

    def __enter__(self):
        self.start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        return self

    def __exit__(self, *exc):
        self.faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self.start


def rotated(names, round_):
    """The variants in the order round `round_` runs them: each round starts at the next one, so that no variant
    always follows the same one."""
    shift = round_ % len(names)
    return names[shift:] + names[:shift]


def median(values):
    values = sorted(values)
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def median_interval(values, level=0.95, resamples=2000):
    """A percentile-bootstrap interval for the median of values (seeded, so a result file can be recomputed)."""
    rng = random.Random(0)
    medians = sorted(median(rng.choices(values, k=len(values))) for _ in range(resamples))
    tail = (1 - level) / 2
    return [medians[int(tail * resamples)], medians[int((1 - tail) * resamples) - 1]]


def machine():
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU, {os.cpu_count()} cores"
