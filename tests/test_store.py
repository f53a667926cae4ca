"""The record store as training uses it: memory that does not grow with the dataset, one embedding per distinct
prompt in the dtype training uses, resumes that encode nothing, encoding at every step without a store, and the
text conditioning the webui computes for long captions and Clip skip."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, train
from PIL import Image

import hypernet
from hypernet import data, errors, training
from hypernet.prompts import PromptEncoder


def make_images(folder, count, captions=None, size=64, seed=0):
    """`count` noise images with distinct captions (or the given ones, in turn)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            os.path.join(folder, f"{i:05d}.png"), compress_level=1
        )
        caption = captions[i % len(captions)] if captions else f"image {i}, noise, {'warm' if i % 2 else 'cold'}"
        with open(os.path.join(folder, f"{i:05d}.txt"), "w") as f:
            f.write(caption)
    return str(folder)


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    return training.load_models(tiny_model_dir)


def encoders_of(models, **kwargs):
    prompt_encoder = PromptEncoder(models.tokenizers, models.text_encoders, **kwargs)
    return data.Encoders(models.vae, prompt_encoder, "cpu", torch.float32, vae_id="t", text_id="t")


@pytest.mark.slow
def test_held_memory_does_not_grow_with_the_dataset(tiny_model_dir, tmp_path):
    """Memory that cannot be paged out, over the process and its DataLoader worker, for 500 and 4,000 images whose
    records (latents and a distinct caption's embedding each) differ by about 100 MiB."""
    results = {}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for count in (500, 4000):
        folder = make_images(tmp_path / f"data{count}", count)
        command = [
            sys.executable,
            os.path.join(ROOT, "tests", "store_worker.py"),
            tiny_model_dir,
            folder,
            str(tmp_path / f"store{count}"),
        ]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        results[count] = json.loads(result.stdout.strip().splitlines()[-1])
    small, large = results[500], results[4000]
    assert large["images"] == 4000 and large["batches"] == 500
    stored_growth = (large["stored"] - small["stored"]) / 2**20
    held_growth = (large["held"] - small["held"]) / 2**20
    assert stored_growth > 100, stored_growth
    print(f"held {small['held'] / 2**20:.1f} -> {large['held'] / 2**20:.1f} MiB, stored +{stored_growth:.1f} MiB")
    assert held_growth < 16, f"held memory grew {held_growth:.1f} MiB for {stored_growth:.1f} MiB more records"


def test_one_embedding_per_distinct_prompt_gives_the_batches_of_one_per_image(models, tmp_path):
    captions = ["a red circle", "a teal square, " * 8, "(a blue star:1.3)"]
    folder = make_images(tmp_path / "data", 9, captions)
    encoders = encoders_of(models)
    settings = data.DataSettings(name="n", resolution=64)
    records, _ = data.prepare_records(
        data.folder_entries(folder), ["[filewords]"], settings, encoders, str(tmp_path / "store")
    )
    assert encoders.prompt_calls == 3 and len(records.prompts) == 3
    assert len(os.listdir(tmp_path / "store" / "prompts" / os.listdir(tmp_path / "store" / "prompts")[0])) >= 1
    samples = data.TrainingSamples(records, ["[filewords]"], settings)
    alone = PromptEncoder(models.tokenizers, models.text_encoders)
    for index in range(9):
        batch = samples.__getitems__([(0, index)])
        ((expected, _),) = alone.each([captions[index % 3]])
        assert torch.equal(batch["encoder_hidden_states"][0], expected), index
    assert records.chunk_counts().tolist() == [1, 2, 1] * 3


def test_embeddings_are_stored_in_the_dtype_training_uses(models, small_dataset, tmp_path):
    encoders = encoders_of(models)
    encoders.embedding_dtype = torch.bfloat16
    settings = data.DataSettings(name="n", resolution=64)
    records, _ = data.prepare_records(
        data.folder_entries(small_dataset), ["[filewords]"], settings, encoders, str(tmp_path / "store")
    )
    embedding, _ = records.embedding(0)
    assert embedding.dtype == torch.bfloat16
    ((full, _),) = encoders.prompt_encoder.each([records.prompt(0)])
    assert torch.equal(embedding, full.to(torch.bfloat16))
    fp32 = encoders_of(models)
    data.prepare_records(data.folder_entries(small_dataset), ["[filewords]"], settings, fp32, str(tmp_path / "store"))
    assert fp32.prompt_calls == 8 and fp32.vae_calls == 0, "another dtype is another entry; the latents are shared"


def test_encoding_on_the_fly_trains_on_the_stored_latents(models, small_dataset, tmp_path):
    for method in ("once", "random", "deterministic"):
        settings = data.DataSettings(
            name="n", resolution=64, random_flip=True, latent_sampling_method=method, use_weight=True, seed=5
        )
        entries = data.folder_entries(small_dataset)
        stored, _ = data.prepare_records(entries, ["[filewords]"], settings, encoders_of(models), str(tmp_path / "s"))
        unstored_encoders = encoders_of(models)
        unstored, _ = data.prepare_records(
            entries, ["[filewords]"], settings, unstored_encoders, str(tmp_path / "u"), encode_latents=False
        )
        assert unstored_encoders.vae_calls == 0 and unstored_encoders.prompt_calls == 0
        keys = [(epoch, i) for epoch in (0, 1) for i in range(8)]
        prompt_encoder = unstored_encoders.prompt_encoder
        a = training.batch_to_device(
            data.TrainingSamples(stored, ["[filewords]"], settings).__getitems__(keys),
            models,
            prompt_encoder,
            0,
            0.0,
            "cpu",
            torch.float32,
        )
        b = training.batch_to_device(
            data.TrainingSamples(unstored, ["[filewords]"], settings, entries).__getitems__(keys),
            models,
            prompt_encoder,
            0,
            0.0,
            "cpu",
            torch.float32,
        )
        for key in ("latents", "noise", "timesteps", "encoder_hidden_states", "weight"):
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5, msg=f"{method} {key}")


def log_lines(caplog):
    return [r.getMessage() for r in caplog.records]


def test_a_resume_encodes_nothing(tiny_model_dir, small_dataset, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="train_hypernetwork")
    flags = ["--hypernetwork_name", "x", "--checkpointing_steps", 2, "--cache_dir", tmp_path / "store"]
    assert train(tiny_model_dir, small_dataset, tmp_path / "run", *flags, steps=2) == 0
    assert any("encoded 8 images and 8 prompts" in line for line in log_lines(caplog))
    caplog.clear()
    assert (
        train(tiny_model_dir, small_dataset, tmp_path / "run", *flags, "--resume_from_checkpoint", "latest", steps=4)
        == 0
    )
    assert any("encoded 0 images and 0 prompts" in line for line in log_lines(caplog))


def test_a_long_caption_is_trained_on_whole_and_clip_skip_is_recorded(tiny_model_dir, tmp_path, monkeypatch):
    caption = ", ".join(f"tag{'abcdefghijklmnopqrstuvwxyz'[i % 26] * 3}" for i in range(28))  # 195 tokens
    folder = make_images(tmp_path / "data", 4, [caption, "a short one"])
    contexts = []
    forward = training.UNetWithHypernetwork.forward

    def spy(self, noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=None):
        contexts.append(tuple(encoder_hidden_states.shape))
        return forward(self, noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs)

    monkeypatch.setattr(training.UNetWithHypernetwork, "forward", spy)
    out = tmp_path / "run"
    assert (
        train(
            tiny_model_dir,
            folder,
            out,
            "--hypernetwork_name",
            "long",
            "--clip_skip",
            2,
            "--save_safetensors",
            "--train_batch_size",
            2,
            steps=4,
        )
        == 0
    )
    models = training.load_models(tiny_model_dir)
    assert PromptEncoder(models.tokenizers, models.text_encoders).token_count(caption) == 195
    assert {shape[1] for shape in contexts} == {77, 231}, "each batch of one context length, the long one whole"
    settings = json.load(open(out / "training_settings.json"))
    assert settings["clip_skip"] == 2 and settings["text_encoding"] == "webui"
    from safetensors import safe_open

    with safe_open(out / "safetensors" / "long.safetensors", "pt") as f:
        assert f.metadata()["clip_skip"] == "2" and f.metadata()["text_encoding"] == "webui"
    assert hypernet.load(out / "safetensors" / "long.safetensors").config.step == 4


def test_a_cache_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(errors.ArgumentError, match=r"^store_dir .*file: is a file, not a folder"):
        data.RecordStore(str(tmp_path / "file"))
