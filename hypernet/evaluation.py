"""How close images are to a style: the share of their pixels in the style's palette."""

import numpy as np

PALETTE_TOLERANCE = 40.0


def palette_share(image, palette, tolerance=PALETTE_TOLERANCE):
    """The share of the image's pixels within `tolerance` (Euclidean distance in 0-255 RGB) of a palette colour.

    For a style of a few flat colours it is near 1 on the style's own images and near 0 on images without those
    colours, whatever they show.
    """
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 1, 3)
    colours = np.asarray(palette, dtype=np.float32).reshape(1, -1, 3)
    distance = np.sqrt(((pixels - colours) ** 2).sum(axis=-1)).min(axis=1)
    return float((distance <= tolerance).mean())
