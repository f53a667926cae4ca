"""Checking a conversion: the written file, read back, computes what the original computes."""

import copy
import math
import warnings

import torch

from .errors import HypernetError
from .formats import DTYPES, load

# Largest allowed |output(converted) - output(original)|, relative to the largest |output(original)|.
TOLERANCE = {"fp32": 0.0, "fp16": 2e-3, "bf16": 2e-2}


def outputs(hn, seed=0):
    """Each width's K and V outputs on a fixed random context, computed in float32."""
    generator = torch.Generator().manual_seed(seed)
    results = {}
    for width in hn.widths:
        context = torch.randn(2, 7, width, generator=generator)
        k, v = (copy.deepcopy(module).float() for module in hn.pair(width))
        results[width] = (k(context), v(context))
    return results


def verify(original, path, dtype_name):
    """Read `path` back and compare its outputs with `original`'s; raise if they disagree or are not finite."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        written = load(path)
    if written.widths != original.widths:
        raise HypernetError(f"{path}: verification failed: widths {written.widths} != {original.widths}")
    tolerance = TOLERANCE[dtype_name]
    with torch.no_grad():
        want, got = outputs(original), outputs(written)
    worst = 0.0
    for width in want:
        for a, b in zip(want[width], got[width]):
            difference = ((a - b).abs().max() / a.abs().max().clamp(min=1e-12)).item()
            worst = max(worst, difference) if math.isfinite(difference) else math.inf
    if worst > tolerance:
        raise HypernetError(f"{path}: verification failed: outputs differ by {worst:.2e} (relative), over {tolerance}")
    return worst


def check_representable(hn, dtype_name, source):
    """Refuse a conversion whose weights overflow the target precision (they would turn into inf)."""
    if dtype_name is None:
        return
    limit = torch.finfo(DTYPES[dtype_name]).max
    largest = max(p.detach().abs().max().item() for p in hn.parameters())
    if largest > limit:
        raise HypernetError(
            f"{source}: a weight of {largest:.3g} does not fit {dtype_name} (largest {limit:.3g}); keep fp32 or bf16"
        )
