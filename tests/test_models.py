"""The one model loader: a diffusers folder, a single checkpoint file (recognised from its tensors, converted once),
a Hub id; and one line for each kind of model that cannot be used."""

import os
import re
import shutil

import numpy as np
import pytest
import torch
from helpers import run_script
from PIL import Image

from hypernet import models


def write_images(folder, count=4):
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        Image.effect_noise((64, 64), 40 + n).convert("RGB").save(folder / f"{n:02d}-noise.png")
    return str(folder)


def test_a_single_file_checkpoint_trains_and_its_pt_names_the_files_hash(tiny_model_dir, tiny_pipeline, tmp_path):
    from helpers import train
    from ldm_checkpoint import write_ldm_checkpoint

    import hypernet
    from hypernet.hashing import shorthash

    checkpoint = tmp_path / "my-model.safetensors"
    write_ldm_checkpoint(tiny_pipeline, str(checkpoint))
    images = write_images(tmp_path / "images")
    out = tmp_path / "run"
    # The tiny model's configs stand in for the family's defaults, which a machine without the Hub cache lacks.
    assert train(checkpoint, images, out, "--config", tiny_model_dir, "--hypernetwork_name", "s", steps=2) == 0
    config = hypernet.load(str(out / "s.pt")).config
    assert (config.sd_checkpoint, config.sd_checkpoint_name) == (shorthash(checkpoint), "my-model")
    assert config.step == 2


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(b"\x00" * 64), r"not a checkpoint hypernet can read"),
        (lambda p: hypernet_file(p), r"not a Stable Diffusion checkpoint \(it holds a hypernetwork\)"),
        (lambda p: lora_file(p), r"not a Stable Diffusion checkpoint \(it holds a LoRA\)"),
    ],
)
def test_files_that_are_not_stable_diffusion_are_one_line(small_dataset, tmp_path, capsys, make, message):
    path = tmp_path / "model.safetensors"
    make(path)
    capsys.readouterr()
    code = run_script(
        "train_hypernetwork.py",
        "--pretrained_model_name_or_path",
        path,
        "--train_data_dir",
        small_dataset,
        "--output_dir",
        tmp_path / "o",
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and re.search(r"--pretrained_model_name_or_path .*" + message, err), err


def hypernet_file(path):
    import hypernet

    hypernet.save(hypernet.Hypernetwork([8, 16]), str(path))


def lora_file(path):
    from safetensors.torch import save_file

    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, str(path))


def test_a_single_file_without_configs_says_what_to_pass(tiny_pipeline, small_dataset, tmp_path, capsys, monkeypatch):
    from ldm_checkpoint import write_ldm_checkpoint

    monkeypatch.setitem(models.DEFAULT_CONFIGS, "sd1", "hypernet-tests/never-cached")
    monkeypatch.setenv("HYPERNET_CACHE_DIR", str(tmp_path / "cache"))  # no conversion of this file from earlier tests
    checkpoint = tmp_path / "v1.safetensors"
    write_ldm_checkpoint(tiny_pipeline, str(checkpoint))
    capsys.readouterr()
    code = run_script(
        "train_hypernetwork.py",
        "--pretrained_model_name_or_path",
        checkpoint,
        "--train_data_dir",
        small_dataset,
        "--output_dir",
        tmp_path / "o",
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert "an SD 1.x checkpoint, but its diffusers configs (hypernet-tests/never-cached)" in err
    assert "pass --config a diffusers folder of an SD 1.x model, or --original_config the checkpoint's .yaml" in err


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda m: shutil.rmtree(m / "vae"), r"vae/config.json is missing"),
        (lambda m: [f.unlink() for f in (m / "unet").glob("*.safetensors")], r"unet/ has no weights"),
        (lambda m: shutil.rmtree(m / "tokenizer"), r"tokenizer/ has no tokenizer.json or vocab.json"),
        (lambda m: (m / "model_index.json").unlink(), r"not a diffusers folder \(no model_index.json\)"),
    ],
)
@pytest.mark.parametrize("script", ["train_hypernetwork.py", "generate.py"])
def test_an_incomplete_model_folder_is_one_line(
    tiny_model_dir, small_dataset, tmp_path, capsys, damage, message, script
):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    damage(model)
    capsys.readouterr()
    flags = ["--train_data_dir", small_dataset] if script == "train_hypernetwork.py" else ["--prompt", "a cat"]
    code = run_script(script, "--pretrained_model_name_or_path", model, *flags, "--output_dir", tmp_path / "o")
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and re.search(message, err) and err.startswith(f"{script}: error: "), err


@pytest.mark.parametrize("script", ["train_hypernetwork.py", "generate.py"])
@pytest.mark.parametrize("content", ["hypernetwork", "random"])
def test_a_single_file_that_is_not_a_stable_diffusion_checkpoint_is_one_line(
    small_dataset, tmp_path, capsys, script, content
):
    import hypernet

    path = tmp_path / "model.safetensors"
    if content == "hypernetwork":
        hypernet.save(hypernet.Hypernetwork([8, 16]), path)
    else:
        path.write_bytes(os.urandom(4096))
    capsys.readouterr()
    flags = ["--train_data_dir", small_dataset] if script == "train_hypernetwork.py" else ["--prompt", "a cat"]
    code = run_script(script, "--pretrained_model_name_or_path", path, *flags, "--output_dir", tmp_path / "o")
    err = capsys.readouterr().err.strip()
    assert (
        code == 2 and "\n" not in err and err.startswith(f"{script}: error: --pretrained_model_name_or_path {path}")
    ), err


def test_a_hub_id_loads_from_the_hugging_face_cache(tiny_model_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from hypernet.errors import ArgumentError

    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    commit = "0" * 40
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    resolved = models.resolve_model("someone/tiny-sd")
    assert resolved.folder == str(repo / "snapshots" / commit) and resolved.name == "tiny-sd"
    with pytest.raises(ArgumentError, match=r"^path someone/absent: cannot be had from the Hugging Face Hub \("):
        models.resolve_model("someone/absent")


def test_debug_dataset_of_a_checkpoint_file_converts_nothing(tiny_pipeline, small_dataset, tmp_path, monkeypatch):
    from ldm_checkpoint import write_ldm_checkpoint

    monkeypatch.setenv("HYPERNET_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "convert_checkpoint", lambda *a: pytest.fail("the checkpoint was converted"))
    checkpoint = tmp_path / "model.safetensors"
    write_ldm_checkpoint(tiny_pipeline, str(checkpoint))
    argv = ["--pretrained_model_name_or_path", checkpoint, "--train_data_dir", small_dataset, "--use_weight"]
    argv += ["--output_dir", tmp_path / "o", "--resolution", "64", "--debug_dataset", tmp_path / "debug"]
    assert run_script("train_hypernetwork.py", *argv) == 0
    weights = sorted((tmp_path / "debug").glob("*.weight.npy"))
    assert len(weights) == len(os.listdir(small_dataset)) // 2
    assert np.load(weights[0]).shape == (4, 8, 8), "SD's VAE: 4 channels, 1/8 of the pixels a side"
