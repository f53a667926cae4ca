"""What size an image trains at and which of its pixels the VAE encodes: the webui's stretch and its --varsize (each
image at its own size), a scaled crop, kohya's aspect-ratio buckets; and the loss weight from its alpha channel.

The webui (modules/textual_inversion/dataset.py) converts an image to RGB, dropping its alpha, and resizes the RGB
to the training width x height with PIL's bicubic filter; its loss weight is the alpha channel of the image as read,
resized once to the latents' size, shifted to a minimum of 0 and scaled to a mean of 1. Every fit here is a
Placement (scale to `scaled`, cut the `size` window at left, top), so the pixels and the weight of any fit come
from one resize each, and the stretch and --varsize pixels are the webui's exactly.
"""

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..errors import UsageError
from ..flags import MAX_SIDE
from .settings import sample_key


@dataclass(frozen=True)
class Placement:
    """An image of original_size scaled to `scaled` (width, height), then the window of `size` at (left, top) cut
    from it."""

    original_size: tuple
    scaled: tuple
    left: int
    top: int
    size: tuple

    @property
    def source_box(self):
        """The window in the original image's coordinates, (left, top, right, bottom)."""
        x = self.original_size[0] / self.scaled[0]
        y = self.original_size[1] / self.scaled[1]
        return (self.left * x, self.top * y, (self.left + self.size[0]) * x, (self.top + self.size[1]) * y)

    def as_tuple(self):
        return (*self.original_size, *self.scaled, self.left, self.top, *self.size)


def image_placement(original_size, settings, shard, row):
    """The Placement of image (shard, row) of a dataset: its random crop drawn from a generator of its own, so that
    it is the same for any number of processes, at every epoch and in every run with the same seed."""
    generator = torch.Generator().manual_seed(sample_key(settings.seed, 1, shard, row))
    return place(original_size, settings, generator)


def place(original_size, settings, generator):
    """The Placement of an image of original_size (width, height) under `settings`; a random crop draws from
    `generator`."""
    if settings.varsize:
        if max(original_size) > MAX_SIDE:
            raise UsageError(
                f"image is {original_size[0]}x{original_size[1]}; --varsize trains it at that size, and at most "
                f"{MAX_SIDE} pixels a side are trained: downscale it or leave out --varsize"
            )
        return Placement(original_size, original_size, 0, 0, original_size)
    if settings.image_fit == "stretch":
        return Placement(original_size, settings.size, 0, 0, settings.size)
    if settings.image_fit == "bucket":
        size, scaled = select_bucket(original_size, settings)
    else:
        size = settings.size
        factor = max(size[0] / original_size[0], size[1] / original_size[1])
        scaled = (max(size[0], round(original_size[0] * factor)), max(size[1], round(original_size[1] * factor)))
    spare_x, spare_y = scaled[0] - size[0], scaled[1] - size[1]
    if settings.center_crop:
        return Placement(original_size, scaled, spare_x // 2, spare_y // 2, size)
    left = int(torch.randint(0, spare_x + 1, (1,), generator=generator))
    top = int(torch.randint(0, spare_y + 1, (1,), generator=generator))
    return Placement(original_size, scaled, left, top, size)


# -- kohya's aspect-ratio buckets (library/train_util.py BucketManager, library/model_util.py) -----------------


@functools.lru_cache(maxsize=8)
def bucket_resolutions(size, min_size, max_size, steps):
    """kohya's predefined buckets for a training size (width, height): the square of about its area, and for every
    width from min_size to max_size in steps, the largest height in steps within the area (and its transpose)."""
    area = size[0] * size[1]
    side = int(math.sqrt(area) // steps) * steps
    buckets = {(side, side)}
    for width in range(min_size, max_size + 1, steps):
        height = min(max_size, int((area // width) // steps) * steps)
        if height >= min_size:
            buckets.update({(width, height), (height, width)})
    return tuple(sorted(buckets))


def round_to_steps(value, steps):
    value = int(value + 0.5)
    return value - value % steps


def select_bucket(original_size, settings):
    """(bucket, scaled size) of an image, as kohya's select_bucket: the predefined bucket nearest in proportions,
    the image scaled to cover it; with bucket_no_upscale, a bucket of the image's own proportions in steps, the
    image scaled down to the training size's area where it is larger, never up."""
    width, height = original_size
    aspect = width / height
    steps = settings.bucket_reso_steps
    if not settings.bucket_no_upscale:
        buckets = bucket_resolutions(settings.size, settings.min_bucket_reso, settings.max_bucket_reso, steps)
        bucket = tuple(original_size)  # an image of a bucket's own size keeps it, as in kohya's
        if bucket not in buckets:
            errors = np.abs(np.array([w / h for w, h in buckets]) - aspect)
            bucket = buckets[int(errors.argmin())]
        scale = bucket[1] / height if aspect > bucket[0] / bucket[1] else bucket[0] / width
        return bucket, (int(width * scale + 0.5), int(height * scale + 0.5))
    area = settings.size[0] * settings.size[1]
    if width * height > area:
        scaled_width = math.sqrt(area * aspect)
        scaled_height = area / scaled_width
        by_width = round_to_steps(scaled_width, steps)
        by_height = round_to_steps(scaled_height, steps)
        error_by_width = abs(by_width / round_to_steps(by_width / aspect, steps) - aspect)
        error_by_height = abs(round_to_steps(by_height * aspect, steps) / by_height - aspect)
        if error_by_width < error_by_height:
            scaled = (by_width, int(by_width / aspect + 0.5))
        else:
            scaled = (int(by_height * aspect + 0.5), by_height)
    else:
        scaled = (width, height)
    bucket = (scaled[0] - scaled[0] % steps, scaled[1] - scaled[1] % steps)
    if min(bucket) < steps:
        raise UsageError(
            f"an image of {width}x{height} is smaller than one --bucket_reso_steps ({steps} pixels) a side, so "
            "--bucket_no_upscale gives it no bucket; upscale it or leave out --bucket_no_upscale"
        )
    return bucket, scaled


# -- pixels and loss weights ----------------------------------------------------------------------------------


def to_rgb(image):
    """An image of any mode as RGB, as the webui converts it (alpha dropped, palettes expanded); 16-bit and 32-bit
    greys scaled to 8 bits first, where PIL's own conversion would clip them to white."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / scale * 255.0, 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def alpha_channel(image):
    """The image's alpha channel, or None: its A band, or a palette's transparent colour (which the webui reads as
    opaque)."""
    if "A" in image.getbands():
        return image.getchannel("A")
    if image.mode == "P" and "transparency" in image.info:
        return image.convert("RGBA").getchannel("A")
    return None


def placed_pixels(rgb, placement):
    """The RGB pixels an image trains on: scaled with PIL's bicubic filter, then cut."""
    left, top = placement.left, placement.top
    scaled = rgb.resize(placement.scaled, Image.BICUBIC)
    return scaled.crop((left, top, left + placement.size[0], top + placement.size[1]))


def alpha_weight(alpha, placement, latent_shape):
    """The webui's loss weight: the alpha channel resized once to the latents' size (the window of `placement`,
    bicubic), repeated over the channels, shifted to a minimum of 0 and scaled to a mean of 1. Ones where there is
    no alpha, and where the alpha is constant (the webui's division gives NaN there)."""
    channels, height, width = latent_shape
    if alpha is None:
        return torch.ones(latent_shape)
    resized = alpha.resize((width, height), Image.BICUBIC, box=placement.source_box)
    weight = torch.from_numpy(np.asarray(resized, dtype=np.float32)).expand(channels, height, width).clone()
    weight -= weight.min()
    mean = weight.mean()
    return weight / mean if mean > 0 else torch.ones(latent_shape)


def pixel_values(images):
    """PIL images as the VAE takes them: (n, 3, height, width) in [-1, 1], as the webui scales them (in float64,
    then to float32)."""
    arrays = [(np.asarray(im.convert("RGB"), dtype=np.float64) / 127.5 - 1.0).astype(np.float32) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
