import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
A1111 = os.path.join(os.path.dirname(ROOT), "shared", "a1111")
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, ROOT)

CASES = ["case1_default_relu", "case3_layernorm_swish", "case7_old_format", "case8_with_optim"]


def a1111_file(case, suffix=".pt"):
    path = os.path.join(A1111, case + suffix)
    if not os.path.exists(path):
        pytest.fail(f"reference file {path} is missing: ../shared/a1111 must sit beside the checkout")
    return path


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


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def train(model_dir, data_dir, output_dir, *flags, steps=6):
    """Run train_hypernetwork.py in this process; returns its exit code."""
    import train_hypernetwork

    reset_accelerate()
    argv = [
        "--pretrained_model_name_or_path", str(model_dir),
        "--output_dir", str(output_dir),
        "--resolution", "64",
        "--max_train_steps", str(steps),
        "--learning_rate", "1e-3",
        "--save_every", "0",
        "--preview_every", "0",
        "--checkpointing_steps", "0",
        "--preview_steps", "3",
    ]  # fmt: skip
    if not any(f in ("--train_data_dir", "--dataset_name") for f in flags):
        argv += ["--train_data_dir", str(data_dir)]
    try:
        return train_hypernetwork.main(argv + [str(f) for f in flags])
    finally:
        reset_accelerate()
