"""How close images are to a style: the distance of their colour distribution to the style images'."""

import numpy as np


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
