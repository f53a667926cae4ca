import os
import sys

import pytest
import torch
from helpers import ROOT

sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.join(ROOT, "examples")]


@pytest.fixture(scope="session", autouse=True)
def _hash_cache(tmp_path_factory):
    """File hashes cached in a folder of the session's, not in the user's ~/.cache."""
    os.environ["HYPERNET_CACHE_DIR"] = str(tmp_path_factory.mktemp("hypernet-cache"))


def build_model(tmp_path_factory, preset):
    from make_tiny_model import make_tiny_model

    directory = str(tmp_path_factory.mktemp(f"{preset}-model"))
    make_tiny_model(directory, preset)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_model(tmp_path_factory, "tiny")


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


@pytest.fixture(scope="session")
def sd2_model_dir(tmp_path_factory):
    return build_model(tmp_path_factory, "sd2")


@pytest.fixture(scope="session")
def sdxl_model_dir(tmp_path_factory):
    return build_model(tmp_path_factory, "sdxl")


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """Eight of the shipped style images with their captions."""
    import shutil

    directory = tmp_path_factory.mktemp("style8")
    source = os.path.join(ROOT, "examples", "style_dataset")
    for name in sorted(n for n in os.listdir(source) if n.endswith(".png"))[::3]:
        shutil.copy(os.path.join(source, name), directory / name)
        shutil.copy(os.path.join(source, name[:-4] + ".txt"), directory / (name[:-4] + ".txt"))
    return str(directory)
