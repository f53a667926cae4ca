import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
A1111 = os.path.join(os.path.dirname(ROOT), "shared", "a1111")
sys.path.insert(0, os.path.join(ROOT, "examples"))

CASES = ["case1_default_relu", "case3_layernorm_swish", "case7_old_format", "case8_with_optim"]


def a1111_file(case, suffix=".pt"):
    path = os.path.join(A1111, case + suffix)
    if not os.path.exists(path):
        pytest.fail(f"reference file {path} is missing: ../shared/a1111 must sit beside the checkout")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from make_tiny_model import make_tiny_model

    directory = str(tmp_path_factory.mktemp("tiny-sd"))
    make_tiny_model(directory, "tiny")
    return directory


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture
def unet(tiny_pipeline):
    return tiny_pipeline.unet


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
