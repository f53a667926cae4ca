import collections
import csv
import json
import os
import pathlib
import subprocess
import sys
import types

import huggingface_hub
import numpy as np
import pytest
import torch
from helpers import ROOT, infotext_hashes, train
from huggingface_hub.utils import filter_repo_objects
from PIL import Image
from safetensors import safe_open

import hypernet
from hypernet import data, training
from hypernet.prompts import PromptEncoder


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def hn_tensors(path):
    data = torch.load(path, weights_only=True)
    return {
        f"{w}.{i}.{k}": t for w in data if isinstance(w, int) for i, sd in enumerate(data[w]) for k, t in sd.items()
    }


def assert_same_weights(a, b, atol=0.0):
    ta, tb = hn_tensors(a), hn_tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        if atol == 0:
            assert torch.equal(ta[key], tb[key]), key
        else:
            assert (ta[key] - tb[key]).abs().max() <= atol, key


def test_full_run_writes_every_file_and_keeps_base_frozen(tiny_model_dir, small_dataset, tmp_path, monkeypatch):
    captured = {}
    pushed = {}

    def fake_create_repo(repo_id, exist_ok=False, token=None):
        pushed["created"] = repo_id
        return types.SimpleNamespace(repo_id=repo_id)

    def fake_upload_folder(repo_id, folder_path, commit_message, ignore_patterns, token):
        files = [os.path.relpath(os.path.join(d, f), folder_path) for d, _, fs in os.walk(folder_path) for f in fs]
        pushed["files"] = sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns))
        pushed["repo"] = repo_id
        with open(os.path.join(folder_path, "training_settings.json")) as f:
            pushed["settings"] = f.read()

    monkeypatch.setattr(huggingface_hub, "create_repo", fake_create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload_folder)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    real_load_models = training.load_models

    def spy(*args, **kwargs):
        models = real_load_models(*args, **kwargs)
        frozen = [*models.text_encoders, models.vae, models.unet]
        captured["before"] = [{k: v.clone() for k, v in m.state_dict().items()} for m in frozen]
        captured["models"] = frozen
        return models

    monkeypatch.setattr(training, "load_models", spy)
    template = tmp_path / "t.txt"
    template.write_text("a painting of [filewords], art by [name]\n")
    out = tmp_path / "run"
    rc = train(
        tiny_model_dir,
        small_dataset,
        out,
        "--hypernetwork_name",
        "inky",
        "--template_file",
        template,
        "--activation_func",
        "relu",
        "--save_every",
        4,
        "--checkpointing_steps",
        4,
        "--checkpoints_total_limit",
        1,
        "--preview_every",
        4,
        "--preview_prompt",
        "a red circle",
        "--preview_prompt",
        "a blue square",
        "--preview_negative_prompt",
        "blurry",
        "--preview_seed",
        5,
        "--preview_guidance_scale",
        4.0,
        "--preview_width",
        64,
        "--preview_height",
        128,
        "--save_safetensors",
        "--report_to",
        "tensorboard",
        "--tracker_project_name",
        "proj",
        "--seed",
        3,
        "--optional_info",
        "inky test run",
        "--push_to_hub",
        "--hub_model_id",
        "me/inky",
        steps=8,
    )
    assert rc == 0
    names = {os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs}
    for expected in [
        "inky.pt",
        "inky.pt.optim",
        "safetensors/inky.safetensors",
        "loss.csv",
        "loss.png",
        "training_settings.json",
        "hypernetworks/inky-4.pt",
        "hypernetworks/inky-4.pt.optim",
        "hypernetworks/inky-8.pt",
        "images/inky-4-0.png",
        "images/inky-4-1.png",
        "images/inky-8-0.png",
        "images/inky-8-1.png",
        "checkpoint-8/hypernetwork.safetensors",
        "checkpoint-8/optimizer.bin",
    ]:
        assert expected in names, f"{expected} missing from {sorted(names)}"
    assert not os.path.exists(out / "checkpoint-4"), "--checkpoints_total_limit 1 keeps only the newest"
    events = [n for n in names if n.startswith("logs/proj/events.out.tfevents")]
    assert events and b"validation" in (out / events[0]).read_bytes(), "previews logged as diffusers logs them"

    rows = read_csv(out / "loss.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert set(rows[0]) == {"step", "epoch", "epoch_step", "loss", "learn_rate"}
    assert [int(r["epoch"]) for r in rows] == [0] * 8 and int(rows[-1]["epoch_step"]) == 8

    settings = json.load(open(out / "training_settings.json"))
    assert settings["dataset_size"] == 8 and settings["template_file"] == str(template)
    assert settings["model_hash"] == hypernet.hashing.base_model_hash(tiny_model_dir)

    hn_file = hypernet.read(out / "inky.pt", optimizer_state=True)
    hn = hn_file.hypernetwork
    assert hn.config.step == 8 and hn.config.name == "inky" and hn.config.activation_func == "relu"
    assert hn.config.sd_checkpoint == settings["model_hash"] and hn.config.sd_checkpoint_name == os.path.basename(
        tiny_model_dir
    )
    assert hn_file.optimizer is not None and hn_file.optimizer.name == "AdamW"
    from_st = hypernet.load(out / "safetensors" / "inky.safetensors")
    x = torch.randn(2, 77, 96)
    assert torch.equal(hypernet.apply_hypernetworks([hn], x)[0], hypernet.apply_hypernetworks([from_st], x)[0])
    assert not torch.equal(hypernet.apply_hypernetworks([hn], x)[0], x)

    preview = Image.open(out / "images" / "inky-8-1.png")
    assert preview.size == (64, 128)
    parameters = preview.info["parameters"]
    assert parameters.startswith("a blue square <hypernet:inky-8:1>\nNegative prompt: blurry\nSteps: 3,")
    assert "Seed: 5" in parameters and infotext_hashes(parameters) == {
        "model": settings["model_hash"],
        "hypernet:inky-8": hypernet.shorthash(out / "hypernetworks" / "inky-8.pt"),
    }
    assert "Hashes" not in Image.open(out / "images" / "inky-4-0.png").info["parameters"].split("Model hash")[0]

    # The webui's Extra Networks card: the first of NAME.png, NAME.preview.png (then .jpg ...) that exists is its
    # preview; NAME.json, its user metadata, gives the card's description.
    assert not os.path.exists(out / "inky.png") and os.path.isfile(out / "inky.preview.png")
    card_preview = Image.open(out / "inky.preview.png")
    assert np.array_equal(np.asarray(card_preview), np.asarray(Image.open(out / "images" / "inky-8-0.png")))
    assert card_preview.info["parameters"].startswith("a red circle <hypernet:inky:1>\n")
    assert infotext_hashes(card_preview.info["parameters"])["hypernet:inky"] == hypernet.shorthash(out / "inky.pt")
    user_metadata = json.load(open(out / "inky.json", encoding="utf8"))
    assert user_metadata["description"].startswith(
        f"Hypernetwork trained on {os.path.basename(tiny_model_dir)} for 8 steps on 8 images; "
    )
    assert (
        user_metadata["description"].endswith(" inky test run") and "activation_func: relu" in user_metadata["notes"]
    )
    assert hypernet.load(out / "inky.pt").config.optional_info == "inky test run"
    assert torch.load(out / "inky.pt", weights_only=True)["optional_info"] == "inky test run"

    with safe_open(out / "safetensors" / "inky.safetensors", "pt") as f:
        keys = f.metadata()
    assert all(isinstance(v, str) for v in keys.values())
    assert keys["modelspec.architecture"] == "stable-diffusion-v1/hypernetwork" and keys["modelspec.title"] == "inky"
    assert keys["modelspec.resolution"] == "64x64" and keys["modelspec.prediction_type"] == "epsilon"
    assert keys["ss_steps"] == "8" and keys["ss_num_train_images"] == "8" and keys["ss_resolution"] == "(64, 64)"
    assert keys["ss_sd_model_hash"] == settings["model_hash"] and keys["ss_base_model_version"] == "sd_v1"
    assert keys["ss_training_comment"] == "inky test run" and keys["modelspec.description"] == "inky test run"
    captions = [open(p).read().strip() for p in sorted(pathlib.Path(small_dataset).glob("*.txt"))]
    want = collections.Counter(t.strip() for c in captions for t in c.split(",") if t.strip())
    assert json.loads(keys["ss_tag_frequency"]) == {os.path.basename(small_dataset): dict(want)}
    assert float(keys["ss_training_started_at"]) <= float(keys["ss_training_finished_at"])

    card = huggingface_hub.ModelCard.load(out / "README.md")
    assert {"hypernetwork", "diffusers-training"} <= set(card.data.tags) and card.data.base_model is None
    assert [w["output"]["url"] for w in card.data.widget] == ["images/inky-8-0.png", "images/inky-8-1.png"]
    assert [w["text"] for w in card.data.widget] == ["a red circle", "a blue square"]
    assert "<hypernet:inky:1>" in card.text and "HypernetworkLoader" in card.text and "hypernet.load(" in card.text
    assert pushed["created"] == pushed["repo"] == "me/inky"
    assert {"inky.pt", "README.md", "inky.preview.png", "inky.json", "images/inky-8-0.png"} <= set(pushed["files"])
    assert not [f for f in pushed["files"] if f.startswith(("checkpoint-", "logs", "hypernetworks", "."))]
    assert not [f for f in pushed["files"] if f.endswith(".optim")] and str(tmp_path) not in pushed["settings"]
    assert "hub_token" not in settings

    for model, before in zip(captured["models"], captured["before"]):
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), f"{type(model).__name__} changed"
        assert not any(p.requires_grad for p in model.parameters())


def test_loss_on_a_fixed_batch_falls(tiny_model_dir, small_dataset, tmp_path):
    out = tmp_path / "fit"
    assert (
        train(
            tiny_model_dir,
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
            steps=40,
        )
        == 0
    )
    models = training.load_models(tiny_model_dir)
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
    unet, scheduler = models.unet, models.noise_scheduler

    def fixed_batch_loss(hn):
        model = training.UNetWithHypernetwork(unet, hn)
        with torch.no_grad():
            loss = training.diffusion_loss(model, scheduler, batch).item()
        model.attachment.detach()
        return loss

    untrained = hypernet.Hypernetwork([96, 40, 80, 160], activation_func="relu").set_multiplier(0.0)
    before, after = fixed_batch_loss(untrained), fixed_batch_loss(hypernet.load(out / "fit.pt"))
    assert after < before * 0.97, (before, after)


def test_resume_from_checkpoint_is_bitwise_exact(tiny_model_dir, small_dataset, tmp_path):
    flags = [
        "--hypernetwork_name",
        "x",
        "--checkpointing_steps",
        3,
        "--train_batch_size",
        2,
        "--gradient_accumulation_steps",
        2,
        "--random_flip",
        "--latent_sampling_method",
        "random",
        "--shuffle_tags",
        "--tag_drop_out",
        0.2,
        "--use_dropout",
        "--layer_structure",
        "1,2,2,1",
        "--learning_rate",
        "1e-3:4, 5e-4",
        "--clip_grad_mode",
        "norm",
        "--clip_grad_value",
        "1.0",
    ]
    assert train(tiny_model_dir, small_dataset, tmp_path / "full", *flags, steps=10) == 0
    assert train(tiny_model_dir, small_dataset, tmp_path / "half", *flags, steps=5) == 0
    assert os.path.isdir(tmp_path / "half" / "checkpoint-5")
    assert (
        train(tiny_model_dir, small_dataset, tmp_path / "half", *flags, "--resume_from_checkpoint", "latest", steps=10)
        == 0
    )
    assert_same_weights(tmp_path / "full" / "x.pt", tmp_path / "half" / "x.pt")
    assert read_csv(tmp_path / "full" / "loss.csv") == read_csv(tmp_path / "half" / "loss.csv")
    rates = [float(r["learn_rate"]) for r in read_csv(tmp_path / "full" / "loss.csv")]
    assert rates == [1e-3] * 4 + [5e-4] * 6, "the webui's schedule: a rate until its step, the last to the end"


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_same_global_batch(tiny_model_dir, small_dataset, tmp_path):
    common = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "{n}",
        "--master_port",
        "{port}",
        os.path.join(ROOT, "train_hypernetwork.py"),
        "--pretrained_model_name_or_path",
        tiny_model_dir,
        "--train_data_dir",
        small_dataset,
        "--resolution",
        "64",
        "--optimizer",
        "SGD",
        "--learning_rate",
        "0.05",
        "--activation_func",
        "relu",
        "--save_every",
        "0",
        "--preview_every",
        "0",
        "--checkpointing_steps",
        "0",
        "--max_train_steps",
        "5",
        "--hypernetwork_name",
        "x",
        "--random_flip",
    ]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    logs = {}
    for n, batch, port in ((2, 1, 29611), (1, 2, 29612)):
        command = [c.format(n=n, port=port) for c in common]
        command += ["--output_dir", str(tmp_path / f"p{n}"), "--train_batch_size", str(batch)]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        logs[n] = result.stderr
    assert "hypernetwork weights identical on all 2 processes" in logs[2]
    assert "2 process(es), total batch 2" in logs[2]
    assert_same_weights(tmp_path / "p1" / "x.pt", tmp_path / "p2" / "x.pt", atol=1e-6)
    l1 = [float(r["loss"]) for r in read_csv(tmp_path / "p1" / "loss.csv")]
    l2 = [float(r["loss"]) for r in read_csv(tmp_path / "p2" / "loss.csv")]
    assert l1 == pytest.approx(l2, abs=1e-5)
