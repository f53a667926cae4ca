"""Training on SDXL (the tiny SDXL preset: text encoders of widths 32 and 64, concatenated to 96, self-attention
widths 80 and 160, so that a wrong width cannot pass unnoticed)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, run_script, train
from PIL import Image
from safetensors import safe_open
from test_train import assert_same_weights, read_csv

import hypernet
from hypernet import data, training
from hypernet.prompts import PromptEncoder


def test_a_full_sdxl_run_writes_every_file(sdxl_model_dir, small_dataset, tmp_path):
    out = tmp_path / "xl"
    assert (
        train(
            sdxl_model_dir,
            small_dataset,
            out,
            "--hypernetwork_name",
            "xl",
            "--save_every",
            3,
            "--checkpointing_steps",
            3,
            "--preview_every",
            3,
            "--preview_prompt",
            "a red circle",
            "--save_safetensors",
            "--random_flip",
            "--activation_func",
            "relu",
            steps=6,
        )
        == 0
    )
    names = {os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs}
    for expected in [
        "xl.pt",
        "xl.pt.optim",
        "safetensors/xl.safetensors",
        "hypernetworks/xl-3.pt",
        "images/xl-3.png",
        "images/xl-6.png",
        "checkpoint-6/hypernetwork.safetensors",
        "loss.csv",
        "loss.png",
    ]:
        assert expected in names, expected
    hn = hypernet.load(out / "xl.pt")
    assert hn.widths == [96, 80, 160], "the text width first, then the self-attention widths, as the webui orders"
    assert hn.config.step == 6 and hn.config.sd_checkpoint == hypernet.hashing.base_model_hash(sdxl_model_dir)
    info = Image.open(out / "images" / "xl-6.png").info["parameters"]
    assert info.startswith("a red circle <hypernet:xl-6:1>\nSteps: 3, Sampler: Euler, CFG scale: 7.0, Seed: 0, ")
    assert "Size: 64x64" in info
    with safe_open(out / "safetensors" / "xl.safetensors", "pt") as f:
        keys = f.metadata()
    assert keys["modelspec.architecture"] == "stable-diffusion-xl-v1-base/hypernetwork"
    assert keys["ss_base_model_version"] == "sdxl_base_v1-0"


def test_sdxl_loss_on_a_fixed_batch_falls(sdxl_model_dir, small_dataset, tmp_path):
    out = tmp_path / "fit"
    assert (
        train(
            sdxl_model_dir,
            small_dataset,
            out,
            "--learning_rate",
            "3e-3",
            "--activation_func",
            "relu",
            "--weight_init",
            "XavierNormal",
            "--image_fit",
            "crop",
            "--center_crop",
            "--hypernetwork_name",
            "fit",
            steps=40,
        )
        == 0
    )
    models = training.load_models(sdxl_model_dir)
    settings = data.DataSettings(name="fit", resolution=64, image_fit="crop", center_crop=True)
    prompt_encoder = PromptEncoder(models.tokenizers, models.text_encoders)
    encoders = data.Encoders(models.vae, prompt_encoder, "cpu", torch.float32)
    records, _ = data.prepare_records(
        data.folder_entries(small_dataset), ["[filewords]"], settings, encoders, str(tmp_path / "store")
    )
    samples = data.TrainingSamples(records, ["[filewords]"], settings)
    batch = training.batch_to_device(
        samples.__getitems__([(0, i) for i in range(8)]), models, prompt_encoder, 0, 0.0, "cpu", torch.float32
    )
    assert batch["encoder_hidden_states"].shape == (8, 77, 96)
    assert batch["added_cond_kwargs"]["text_embeds"].shape == (8, 64)

    def loss(hn):
        model = training.UNetWithHypernetwork(models.unet, hn)
        with torch.no_grad():
            value = training.diffusion_loss(model, models.noise_scheduler, batch).item()
        model.attachment.detach()
        return value

    untrained = hypernet.Hypernetwork([96, 80, 160], activation_func="relu").set_multiplier(0.0)
    assert loss(hypernet.load(out / "fit.pt")) < loss(untrained) * 0.97


def test_sdxl_resume_is_bitwise_exact(sdxl_model_dir, small_dataset, tmp_path):
    flags = [
        "--hypernetwork_name",
        "x",
        "--checkpointing_steps",
        3,
        "--train_batch_size",
        2,
        "--random_flip",
        "--latent_sampling_method",
        "random",
        "--shuffle_tags",
        "--use_8bit_adam",
    ]
    assert train(sdxl_model_dir, small_dataset, tmp_path / "full", *flags, steps=6) == 0
    assert train(sdxl_model_dir, small_dataset, tmp_path / "half", *flags, steps=3) == 0
    assert (
        train(sdxl_model_dir, small_dataset, tmp_path / "half", *flags, "--resume_from_checkpoint", "latest", steps=6)
        == 0
    )
    assert_same_weights(tmp_path / "full" / "x.pt", tmp_path / "half" / "x.pt")
    assert read_csv(tmp_path / "full" / "loss.csv") == read_csv(tmp_path / "half" / "loss.csv")


def test_time_ids_are_the_images_size_and_crop(sdxl_model_dir, tmp_path):
    for name, size in (("wide.png", (160, 96)), ("tall.png", (64, 200))):
        Image.new("RGB", size, (90, 20, 200)).save(tmp_path / name)
    entries = data.folder_entries(str(tmp_path))
    models = training.load_models(sdxl_model_dir)

    class FakeVAE(torch.nn.Module):
        config = type("Config", (), {"scaling_factor": 1.0, "latent_channels": 4, "block_out_channels": [1] * 4})

        def encode(self, pixels):
            latent = torch.zeros(pixels.shape[0], 4, pixels.shape[2] // 8, pixels.shape[3] // 8)
            return type("Out", (), {"latent_dist": type("Dist", (), {"mean": latent, "std": latent + 1})})

    encoders = data.Encoders(FakeVAE(), PromptEncoder(models.tokenizers, models.text_encoders), "cpu", torch.float32)
    for settings in (
        data.DataSettings(name="n", resolution=64, image_fit="crop", random_flip=True, seed=1, shuffle_tags=True),
        data.DataSettings(name="n", varsize=True, shuffle_tags=True),
    ):
        records, _ = data.prepare_records(entries, ["x"], settings, encoders, str(tmp_path / "store"))
        samples = data.TrainingSamples(records, ["x"], settings)
        for index, (original, record) in enumerate(zip([(64, 200), (160, 96)], (records[0], records[1]))):
            width, height = record.size
            scale = max(width / original[0], height / original[1])
            scaled = (max(width, round(original[0] * scale)), max(height, round(original[1] * scale)))
            top, left = record.crop_top_left
            assert 0 <= left <= scaled[0] - width and 0 <= top <= scaled[1] - height
            for epoch in range(6):
                time_ids = samples.__getitems__([(epoch, index)])["time_ids"][0]
                generator = torch.Generator().manual_seed(data.sample_key(settings.seed, 3, epoch, index))
                flipped = settings.random_flip and bool(torch.rand(1, generator=generator) < 0.5)
                crop_left = scaled[0] - left - width if flipped else left
                assert time_ids.tolist() == [original[1], original[0], top, crop_left, height, width]
            if settings.varsize:
                assert record.size == original, "--varsize trains each image at its own size, as the webui"


def test_an_sdxl_hypernetwork_applies_through_generate(sdxl_model_dir, small_dataset, tmp_path):
    assert (
        train(
            sdxl_model_dir,
            small_dataset,
            tmp_path / "run",
            "--hypernetwork_name",
            "xl",
            "--learning_rate",
            "1e-2",
            "--weight_init",
            "XavierNormal",
            steps=3,
        )
        == 0
    )
    images = {}
    for multiplier in ("0", "1"):
        out = tmp_path / f"s{multiplier}"
        assert (
            run_script(
                "generate.py",
                "--pretrained_model_name_or_path",
                sdxl_model_dir,
                "--prompt",
                "a star",
                "--hypernetwork",
                f"{tmp_path / 'run' / 'xl.pt'}:{multiplier}",
                "--num_inference_steps",
                3,
                "--output_dir",
                out,
                "--no_progress",
            )
            == 0
        )
        images[multiplier] = np.asarray(Image.open(out / "00000-0.png"), dtype=np.int16)
    assert (
        run_script(
            "generate.py",
            "--pretrained_model_name_or_path",
            sdxl_model_dir,
            "--prompt",
            "a star",
            "--num_inference_steps",
            3,
            "--output_dir",
            tmp_path / "plain",
            "--no_progress",
        )
        == 0
    )
    assert np.array_equal(images["0"], np.asarray(Image.open(tmp_path / "plain" / "00000-0.png"), dtype=np.int16))
    assert np.abs(images["1"] - images["0"]).mean() > 0.5


@pytest.mark.slow
def test_sdxl_two_processes_match_one(sdxl_model_dir, small_dataset, tmp_path):
    common = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--master_port",
        "{port}",
        "--nproc_per_node",
        "{n}",
        os.path.join(ROOT, "train_hypernetwork.py"),
        "--pretrained_model_name_or_path",
        sdxl_model_dir,
        "--train_data_dir",
        small_dataset,
        "--resolution",
        "64",
        "--optimizer",
        "SGD",
        "--learning_rate",
        "0.05",
        "--save_every",
        "0",
        "--preview_every",
        "0",
        "--checkpointing_steps",
        "0",
        "--max_train_steps",
        "4",
        "--hypernetwork_name",
        "x",
        "--random_flip",
    ]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    for n, batch, port in ((2, 1, 29641), (1, 2, 29642)):
        command = [c.format(n=n, port=port) for c in common]
        command += ["--output_dir", str(tmp_path / f"p{n}"), "--train_batch_size", str(batch)]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(tmp_path / "p1" / "x.pt", tmp_path / "p2" / "x.pt", atol=1e-6)


def test_the_sd15_options_work_on_sdxl(sdxl_model_dir, small_dataset, tmp_path):
    template = tmp_path / "t.txt"
    template.write_text("a painting of [filewords], art by [name]\n[filewords], [name] style\n")
    out = tmp_path / "opts"
    assert (
        train(
            sdxl_model_dir,
            small_dataset,
            out,
            "--hypernetwork_name",
            "xl",
            "--template_file",
            template,
            "--tag_drop_out",
            0.3,
            "--use_weight",
            "--varsize",
            "--latent_sampling_method",
            "deterministic",
            "--learning_rate",
            "1e-3:2, 5e-4",
            "--clip_grad_mode",
            "norm",
            "--clip_grad_value",
            1.0,
            "--mixed_precision",
            "bf16",
            "--gradient_checkpointing",
            "--report_to",
            "tensorboard",
            "--dataloader_num_workers",
            1,
            "--train_batch_size",
            2,
            steps=4,
        )
        == 0
    )
    rows = read_csv(out / "loss.csv")
    assert [float(r["learn_rate"]) for r in rows] == [1e-3, 1e-3, 5e-4, 5e-4]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "logs" / "hypernet"))
    hn = hypernet.load(out / "xl.pt")
    assert hn.config.step == 4 and all(torch.isfinite(p).all() for p in hn.parameters())
