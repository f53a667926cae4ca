"""What training is fed, written out for a person to look at (kohya's --debug_dataset): each image's pixels as the
VAE encodes them, the prompt its first use trains on, and its loss weight map, made by the same code as training."""

import os
import re

import numpy as np

from ..files import atomic_write
from .geometry import alpha_channel, alpha_weight, image_placement, placed_pixels, to_rgb
from .sources import changing_prompt, check_size, decode_image, fixed_prompt, image_header


def debug_name(entry):
    """A file stem for an image: its file's stem, or its row in a dataset."""
    if os.path.isfile(entry.label):
        return os.path.splitext(os.path.basename(entry.label))[0]
    return re.sub(r"[^\w.-]+", "-", entry.label).strip("-")


def write_debug_dataset(entries, template, settings, latent_shape, folder):
    """For every image, FOLDER/STEM.png (its RGB pixels at the size they are encoded, placed as training places them;
    unmirrored), FOLDER/STEM.txt (the prompt of its first use: with fixed prompts its only one, else epoch 0's) and,
    with settings.use_weight, FOLDER/STEM.weight.npy (its loss weight, float32, at latent size). latent_shape maps a
    (width, height) to the latents' (channels, height, width). Returns the number of images written."""
    os.makedirs(folder, exist_ok=True)
    used, index = set(), 0
    for chunk in entries.chunks():
        for entry in chunk:
            raw = entry.read()
            original_size = image_header(raw, entry.label)
            check_size(original_size, entry.label)
            placement = image_placement(original_size, settings, entry.shard, entry.row)
            image = decode_image(raw, entry.label)
            stem = debug_name(entry)
            if stem in used:
                stem = os.path.basename(entry.label)
            used.add(stem)
            path = os.path.join(folder, stem)
            with atomic_write(path + ".png") as tmp:
                placed_pixels(to_rgb(image), placement).save(tmp, format="PNG")
            if settings.fixed_prompts:
                prompt = fixed_prompt(template, entry.caption, settings, entry.shard, entry.row)
            else:
                prompt = changing_prompt(template, entry.caption, settings, 0, index)
            with atomic_write(path + ".txt") as tmp, open(tmp, "w", encoding="utf-8") as f:
                f.write(prompt.replace("\n", " ") + "\n")
            if settings.use_weight:
                weight = alpha_weight(alpha_channel(image), placement, latent_shape(placement.size))
                with atomic_write(path + ".weight.npy") as tmp, open(tmp, "wb") as f:
                    np.save(f, weight.numpy().astype(np.float32))
            index += 1
    return index
