"""Make the training-data fixtures with the webui's own code (see README.md beside this file).

    python make_fixtures.py --webui /path/to/stable-diffusion-webui

Run it in an environment with torch, numpy and Pillow (hypernet's own works: nothing of hypernet is imported). It
draws the images in images/ (seeded), runs the webui's unmodified `modules/textual_inversion/dataset.py`
(PersonalizedBase) and `modules/textual_inversion/learn_schedule.py` (LearnRateScheduler) on them, and writes what
they compute to fixtures.safetensors (pixels as the VAE gets them, loss weights) and fixtures.json (which files
trained, captions, template lines, learning rates per step and the step training ends at).
"""

import argparse
import json
import os
import random
import sys
import types

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGES = os.path.join(HERE, "images")
TEMPLATE = os.path.join(HERE, "template.txt")
LATENT_CHANNELS, LATENT_FACTOR = 4, 8  # SD's VAE: 4 channels, 1/8 of the pixels a side

# The dataset configurations of the webui's Train tab that the fixtures cover: (width, height, varsize).
DATASETS = {"square_64": (64, 64, False), "wide_96x64": (96, 64, False), "varsize": (64, 64, True)}

# Learning-rate strings of the webui's Train tab, with the tab's max steps and the step a run resumes at.
SCHEDULES = [
    ("1e-3", 20, 0),
    ("1e-3:10", 20, 0),
    ("5e-3:10, 1e-3:20, 1e-5:30", 50, 0),
    ("5e-3:10, 1e-3:20, 1e-5:30", 25, 0),
    ("5e-3:10, 1e-3:20, 1e-5:30", 50, 15),
    ("5e-5:5, 5e-6:15, 5e-7", 30, 0),
    ("5e-5:5, 5e-6:15, 5e-7", 30, 8),
    ("1e-3:5, 1e-4:-1", 20, 0),
    ("2e-3:-1", 12, 0),
    ("0.005", 7, 3),
]


def smooth_field(rng, height, width, channels):
    """Smooth random colours with some noise, so that resampling filters differ visibly."""
    coarse = rng.random((3, 4, channels))
    image = Image.fromarray((coarse * 255).astype(np.uint8).squeeze()).resize((width, height), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float64).reshape(height, width, channels)
    array += rng.normal(0, 12, array.shape)
    return np.clip(array, 0, 255).astype(np.uint8)


def draw_images():
    """The fixture folder: images of every kind the webui trains on, captions, and files it skips."""
    os.makedirs(IMAGES, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(smooth_field(rng, 80, 80, 3)).save(os.path.join(IMAGES, "01-square.png"))
    Image.fromarray(smooth_field(rng, 72, 120, 3)).save(os.path.join(IMAGES, "02-wide.jpg"), quality=95)
    Image.fromarray(smooth_field(rng, 104, 56, 3)).save(os.path.join(IMAGES, "03-tall.webp"), lossless=True)
    rgba = smooth_field(rng, 40, 72, 4)
    rgba[..., 3] = np.linspace(0, 255, 72)[None, :].astype(np.uint8)  # transparent left, opaque right
    Image.fromarray(rgba, "RGBA").save(os.path.join(IMAGES, "04-rgba-wide.png"))
    rgba = smooth_field(rng, 48, 48, 4)
    rgba[..., 3] = np.linspace(255, 0, 48)[:, None].astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(os.path.join(IMAGES, "05-rgba-square.png"))
    Image.fromarray(smooth_field(rng, 48, 64, 3)).quantize(16).save(os.path.join(IMAGES, "06-palette.png"))
    Image.fromarray(smooth_field(rng, 40, 40, 3)).quantize(16).save(os.path.join(IMAGES, "07-anim.gif"))
    Image.fromarray(smooth_field(rng, 64, 88, 3)).save(os.path.join(IMAGES, "08-scan.tiff"))
    Image.fromarray(smooth_field(rng, 64, 64, 1).squeeze(), "L").save(os.path.join(IMAGES, "09-gray.png"))
    la = smooth_field(rng, 56, 56, 2)
    Image.fromarray(la, "LA").save(os.path.join(IMAGES, "10-gray-alpha.png"))
    with open(os.path.join(IMAGES, "01-square.txt"), "w", encoding="utf-8") as f:
        f.write("a red circle, teal background, bold outline\n")
    with open(os.path.join(IMAGES, "04-rgba-wide.txt"), "w", encoding="utf-8") as f:
        f.write("a fading stripe")
    with open(os.path.join(IMAGES, "notes.md"), "w", encoding="utf-8") as f:
        f.write("not an image: the webui skips it\n")
    with open(TEMPLATE, "w", encoding="utf-8") as f:  # duplicate lines weigh double; the blank line is a candidate
        f.write("a painting of [filewords], art by [name]\n")
        f.write("a picture of [filewords]\n")
        f.write("a painting of [filewords], art by [name]\n")
        f.write("\n")
        f.write("  [name] style, [filewords]  \n")


def install_stand_ins():
    """What dataset.py imports from the rest of the webui and from ldm, torchvision and tqdm, reduced to what
    PersonalizedBase uses."""
    modules = types.ModuleType("modules")
    devices = types.ModuleType("modules.devices")
    devices.cpu = torch.device("cpu")
    devices.autocast = lambda: torch.autocast("cpu", enabled=False)
    shared = types.ModuleType("modules.shared")
    shared.opts = types.SimpleNamespace(dataset_filename_word_regex="", dataset_filename_join_string=" ")
    shared.state = types.SimpleNamespace(interrupted=False)
    modules.devices, modules.shared = devices, shared
    distributions = types.ModuleType("ldm.modules.distributions.distributions")

    class DiagonalGaussianDistribution:
        def __init__(self, shape):
            self.shape, self.std = shape, 1

    distributions.DiagonalGaussianDistribution = DiagonalGaussianDistribution
    transforms = types.ModuleType("torchvision.transforms")
    transforms.RandomHorizontalFlip = lambda p: None
    torchvision = types.ModuleType("torchvision")
    torchvision.transforms = transforms
    sys.modules.update(
        {
            "modules": modules,
            "modules.devices": devices,
            "modules.shared": shared,
            "ldm": types.ModuleType("ldm"),
            "ldm.modules": types.ModuleType("ldm.modules"),
            "ldm.modules.distributions": types.ModuleType("ldm.modules.distributions"),
            "ldm.modules.distributions.distributions": distributions,
            "torchvision": torchvision,
            "torchvision.transforms": transforms,
        }
    )
    return DiagonalGaussianDistribution


class RecordingModel:
    """The webui's sd_model as PersonalizedBase uses it: encode_first_stage records the pixels it is given (what
    the VAE encodes) and the latents it returns have the VAE's shape, so that weight maps come out at latent size."""

    def __init__(self, distribution):
        self.distribution, self.pixels = distribution, []

    def encode_first_stage(self, pixels):
        self.pixels.append(pixels[0].clone())
        _, _, height, width = pixels.shape
        return self.distribution((1, LATENT_CHANNELS, height // LATENT_FACTOR, width // LATENT_FACTOR))

    def get_first_stage_encoding(self, distribution):
        return torch.zeros(distribution.shape)


def dataset_fixtures(webui_dataset, distribution):
    tensors, files = {}, {}
    for name, (width, height, varsize) in DATASETS.items():
        model = RecordingModel(distribution)
        random.seed(0)
        dataset = webui_dataset.PersonalizedBase(
            IMAGES,
            width,
            height,
            1,
            placeholder_token="fixture-style",
            model=model,
            device="cpu",
            template_file=TEMPLATE,
            varsize=varsize,
            use_weight=True,
        )
        trained = []
        for entry, pixels in zip(dataset.dataset, model.pixels):
            stem = os.path.basename(entry.filename)
            trained.append({"file": stem, "caption": entry.filename_text})
            tensors[f"{name}/{stem}/pixels"] = pixels.contiguous()
            tensors[f"{name}/{stem}/weight"] = entry.weight.contiguous()
        files[name] = {"width": width, "height": height, "varsize": varsize, "trained": trained}
        template_lines = dataset.lines
    return tensors, files, template_lines


def schedule_fixtures(learn_schedule):
    """For each string, the rate the webui trains each step at (from the resumed step on) and the step it stops at,
    as its train_hypernetwork loop drives LearnRateScheduler: apply() before every step, stop when finished."""
    results = []
    for text, max_steps, initial_step in SCHEDULES:
        scheduler = learn_schedule.LearnRateScheduler(text, max_steps, initial_step, verbose=False)
        optimizer = types.SimpleNamespace(param_groups=[{"lr": scheduler.learn_rate}])
        rates, step = [], initial_step
        while True:
            scheduler.apply(optimizer, step)
            if scheduler.finished:
                break
            rates.append(optimizer.param_groups[0]["lr"])
            step += 1
        results.append(
            {"text": text, "max_steps": max_steps, "initial_step": initial_step, "rates": rates, "stop_step": step}
        )
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--webui", required=True, help="a checkout of stable-diffusion-webui")
    args = parser.parse_args()
    draw_images()
    distribution = install_stand_ins()
    sys.path.insert(0, os.path.join(args.webui, "modules", "textual_inversion"))
    import dataset as webui_dataset
    import learn_schedule

    tensors, files, template_lines = dataset_fixtures(webui_dataset, distribution)
    save_file(tensors, os.path.join(HERE, "fixtures.safetensors"))
    fixtures = {"datasets": files, "template_lines": template_lines, "schedules": schedule_fixtures(learn_schedule)}
    with open(os.path.join(HERE, "fixtures.json"), "w", encoding="utf-8") as f:
        json.dump(fixtures, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
