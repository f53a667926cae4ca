"""The pretrained demo model in examples/demo-sd: it loads with from_pretrained, follows its prompts' colours, and
its script gives the same files for the same seed."""

import colorsys
import hashlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT
from pretrain_demo_model import COLOURS, subject_text

DEMO = os.path.join(ROOT, "examples", "demo-sd")


@pytest.fixture(scope="module")
def demo():
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(DEMO, safety_checker=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def hue(rgb):
    return colorsys.rgb_to_hsv(*(np.asarray(rgb, dtype=np.float64) / 255))[0] * 360


def shape_hue(image):
    """(hue in degrees of the image's saturated pixels, their share): the shape's colour, whatever its shade;
    the backgrounds are grays."""
    hsv = np.asarray(image.convert("HSV"), dtype=np.float64).reshape(-1, 3)
    saturated = hsv[hsv[:, 1] > 0.35 * 255]
    if not len(saturated):
        return None, 0.0
    angles = saturated[:, 0] / 255 * 2 * np.pi
    mean = math.degrees(math.atan2(np.sin(angles).mean(), np.cos(angles).mean())) % 360
    return mean, len(saturated) / len(hsv)


def nearest_named_colour(degrees):
    return min(
        COLOURS, key=lambda name: min(abs(hue(COLOURS[name]) - degrees), 360 - abs(hue(COLOURS[name]) - degrees))
    )


def test_the_demo_model_is_the_sd1_layout_in_safetensors(demo):
    assert type(demo.unet).__name__ == "UNet2DConditionModel" and demo.unet.config.cross_attention_dim == 64
    assert type(demo.vae).__name__ == "AutoencoderKL" and type(demo.text_encoder).__name__ == "CLIPTextModel"
    for part in ("unet", "vae", "text_encoder"):
        assert os.path.isfile(
            os.path.join(
                DEMO, part, "model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors"
            )
        )
    assert demo.unet.dtype == torch.float32


@pytest.mark.parametrize("colour", list(COLOURS))
def test_the_demo_model_draws_the_colour_its_prompt_names(demo, colour):
    for seed in (0, 1):
        generator = torch.Generator().manual_seed(seed)
        (image,) = demo(
            subject_text("circle", colour, "in the middle"),
            num_inference_steps=20,
            generator=generator,
            height=64,
            width=64,
        ).images
        degrees, share = shape_hue(image)
        assert share >= 0.08, (seed, share)
        assert nearest_named_colour(degrees) == colour, (seed, degrees)


@pytest.mark.slow
def test_the_pretraining_script_gives_the_same_files_for_the_same_seed(tmp_path):
    digests = []
    for run in ("a", "b"):
        out = tmp_path / run
        result = subprocess.run(
            [
                sys.executable,
                "examples/pretrain_demo_model.py",
                "--output_dir",
                str(out),
                "--num_images",
                "64",
                "--vae_steps",
                "2",
                "--steps",
                "2",
                "--batch_size",
                "4",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
        assert "unet/diffusion_pytorch_model.safetensors" in files and "samples.png" in files
        digests.append({f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in files})
    assert digests[0] == digests[1]
