"""What a hypernetwork carries to where users take it: hashes, ModelSpec keys, the webui's card files, the model
card, checked against the rules the other programs apply when they read them."""

import hashlib
import json
import os
from datetime import datetime, timezone

import pytest
import torch
from helpers import CIVITAI_NETWORK, a1111_file, infotext_hashes, run_script
from huggingface_hub import ModelCard
from PIL import Image
from safetensors import safe_open

import hypernet
from hypernet.images import infotext, save_png
from hypernet.modelspec import model_family, modelspec_metadata, tag_frequency, training_keys
from hypernet.publishing import file_hashes, hub_files, model_card, write_card_files


def test_file_hashes_are_the_webui_s_and_civitai_s(tmp_path):
    cases = json.load(open(os.path.join(os.path.dirname(a1111_file("case1_default_relu")), "cases.json")))
    for case in ("case1_default_relu", "case8_with_optim"):
        hashes = file_hashes(a1111_file(case))
        assert (
            hashes["sha256"]
            == cases[case]["sha256"]
            == hashlib.sha256(open(a1111_file(case), "rb").read()).hexdigest()
        )
        assert hashes["webui"] == cases[case]["shorthash"] == hashes["autov2"] == hashes["sha256"][:10]


def test_tag_frequency_counts_comma_separated_tags_as_kohya_does():
    assert tag_frequency(["a cat, red , a cat", "red,,  blue", ""]) == {"a cat": 2, "red": 2, "blue": 1}


@pytest.mark.parametrize(
    "widths, sdxl, prediction, family, architecture, version",
    [
        (hypernet.SD1_WIDTHS, False, "epsilon", "sd1", "stable-diffusion-v1/hypernetwork", "sd_v1"),
        (hypernet.SD2_WIDTHS, False, "epsilon", "sd2", "stable-diffusion-v2-512/hypernetwork", "sd_v2"),
        (hypernet.SD2_WIDTHS, False, "v_prediction", "sd2-v", "stable-diffusion-v2-768-v/hypernetwork", "sd_v2"),
        (hypernet.SDXL_WIDTHS, False, "epsilon", "sdxl", "stable-diffusion-xl-v1-base/hypernetwork", "sdxl_base_v1-0"),
        ((96, 80, 160), True, "epsilon", "sdxl", "stable-diffusion-xl-v1-base/hypernetwork", "sdxl_base_v1-0"),
    ],
)
def test_modelspec_architecture_follows_the_base_model(widths, sdxl, prediction, family, architecture, version):
    assert model_family(widths, sdxl, prediction) == family
    hn = hypernet.Hypernetwork(list(widths), name="style", activation_func="relu")
    spec = modelspec_metadata(hn, "style-file", family, date=datetime(2026, 12, 4, tzinfo=timezone.utc))
    assert spec["modelspec.architecture"] == architecture and spec["modelspec.sai_model_spec"] == "1.0.0"
    assert spec["modelspec.title"] == "style" and spec["modelspec.date"] == "2026-12-04"
    assert spec["modelspec.usage_hint"].startswith("<hypernet:style-file:1>")
    assert spec["modelspec.prediction_type"] == ("v" if prediction == "v_prediction" else "epsilon")
    keys = training_keys(family, "base", "0123456789", (512, 768), 10, 3, {"red": 2}, "data", 1.5, 2.5, {"seed": 7})
    assert keys["ss_base_model_version"] == version and keys["ss_resolution"] == "(512, 768)"
    assert keys["ss_tag_frequency"] == '{"data": {"red": 2}}' and keys["ss_seed"] == "7"
    assert all(isinstance(v, str) for v in {**spec, **keys}.values())


def test_every_safetensors_file_carries_modelspec_and_load_ignores_keys_it_does_not_know(tmp_path):
    hn = hypernet.load(a1111_file("case3_layernorm_swish"))
    assert run_script("convert.py", a1111_file("case3_layernorm_swish"), tmp_path / "swish.safetensors") == 0
    with safe_open(tmp_path / "swish.safetensors", "pt") as f:
        keys = f.metadata()
    assert keys["modelspec.architecture"] == "stable-diffusion-v1/hypernetwork"
    assert keys["modelspec.description"] == hn.config.optional_info and keys["modelspec.resolution"] == "512x512"

    others = {"ss_tag_frequency": '{"x": {"y": 1}}', "modelspec.title": "mine", "ss_note": "{not json", "z": "1"}
    hypernet.save(hn, tmp_path / "more.safetensors", metadata=others)
    with safe_open(tmp_path / "more.safetensors", "pt") as f:
        assert {k: f.metadata()[k] for k in others} == others
    again = hypernet.load(tmp_path / "more.safetensors")
    x = torch.randn(1, 77, 96)
    assert torch.equal(hypernet.apply_hypernetworks([again], x)[0], hypernet.apply_hypernetworks([hn], x)[0])
    with pytest.raises(hypernet.HypernetError, match=r"metadata keys \['widths'\] are the format's own"):
        hypernet.save(hn, tmp_path / "bad.safetensors", metadata={"widths": "[1]"})


def webui_card(page_path):
    """What the webui's Extra Networks page shows for a hypernetwork file (modules/ui_extra_networks.py and
    extra_networks.py, v1.9 and v1.10): the first of PATH.{png,jpg,jpeg,webp,gif} and PATH.preview.{...} that
    exists (PATH without extension), the description of PATH.txt or PATH.description.txt, replaced by the
    "description" of PATH.json, the user metadata."""
    path = os.path.splitext(page_path)[0]
    candidates = [
        f for ext in ("png", "jpg", "jpeg", "webp", "gif") for f in (f"{path}.{ext}", f"{path}.preview.{ext}")
    ]
    preview = next((f for f in candidates if os.path.exists(f)), None)
    description = next((open(f).read() for f in (f"{path}.txt", f"{path}.description.txt") if os.path.exists(f)), None)
    metadata = json.load(open(path + ".json", encoding="utf8")) if os.path.exists(path + ".json") else {}
    return preview, metadata.get("description", description), metadata


def test_card_files_are_what_the_webui_reads(tmp_path):
    hn_path = tmp_path / "style.pt"
    hypernet.save(hypernet.load(a1111_file("case1_default_relu")), hn_path)
    preview = tmp_path / "images" / "style-100.png"
    preview.parent.mkdir()
    save_png(Image.new("RGB", (8, 8), (10, 20, 30)), preview, "a cat <hypernet:style-100:1>\nSteps: 20")
    written = write_card_files(hn_path, preview, "trained on sd", "seed: 1")
    assert written == [str(tmp_path / "style.preview.png"), str(tmp_path / "style.json")]
    shown, description, metadata = webui_card(str(hn_path))
    assert shown == str(tmp_path / "style.preview.png") and description == "trained on sd"
    assert open(shown, "rb").read() == preview.read_bytes(), "copied as it is"
    assert metadata == {"description": "trained on sd", "notes": "seed: 1"}

    # What a user set in the webui's metadata editor stays; the preview's infotext can name the file itself.
    json.dump({**metadata, "preferred weight": 0.7}, open(tmp_path / "style.json", "w"))
    text = infotext("a cat", hypernetworks=[("style", 1.0, hypernet.shorthash(hn_path))])
    write_card_files(hn_path, preview, "again", "seed: 2", text)
    shown, description, metadata = webui_card(str(hn_path))
    assert description == "again" and metadata["preferred weight"] == 0.7 and metadata["notes"] == "seed: 2"
    with Image.open(shown) as image:
        assert image.info["parameters"] == text and image.getpixel((0, 0)) == (10, 20, 30)


def test_infotext_names_hypernetworks_as_the_webui_and_civitai_read_them():
    text = infotext(
        "a cat",
        steps=20,
        seed=3,
        model_hash="abcdef0123",
        hypernetworks=[("style", 0.8, "0123456789"), ("ink", 1.0, None)],
    )
    prompt, parameters = text.split("\n")
    assert prompt == "a cat <hypernet:style:0.8> <hypernet:ink:1>"
    assert CIVITAI_NETWORK.findall(prompt) == [("hypernet", "style", "0.8"), ("hypernet", "ink", "1")]
    assert infotext_hashes(text) == {"model": "abcdef0123", "hypernet:style": "0123456789"}
    # The webui's paste appends <hypernet:NAME:STRENGTH> for an old 'Hypernet' field: none, so none is doubled.
    assert "Hypernet:" not in parameters and parameters.startswith("Steps: 20, Seed: 3, Model hash: abcdef0123")


def test_model_card_front_matter_and_text(tmp_path):
    for name in (
        "style.pt",
        "README.md",
        "images/style-10.png",
        "checkpoint-10/optimizer.bin",
        "logs/x/events",
        "wandb/run-1/files/config.yaml",
        "hypernetworks/style-5.pt",
        ".hypernet.lock",
    ):
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    files = hub_files(tmp_path)
    assert files == ["README.md", "images/style-10.png", "style.pt"]
    card = model_card(
        "style",
        "stabilityai/stable-diffusion-2-1",
        "Trained.",
        [("a cat", "images/style-10.png")],
        {"steps": 10, "learning_rate": "5e-3"},
        files,
        "me/style",
    )
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.base_model == "stabilityai/stable-diffusion-2-1" and loaded.data.library_name == "diffusers"
    assert {"hypernetwork", "diffusers-training"} <= set(loaded.data.tags)
    assert loaded.data.widget == [{"text": "a cat", "output": {"url": "images/style-10.png"}}]
    for expected in (
        "# style",
        "Trained.",
        "![a cat](images/style-10.png)",
        "models/hypernetworks/",
        "<hypernet:style:1>",
        "HypernetworkLoader",
        'hf_hub_download("me/style", "style.pt")',
        "| learning_rate | 5e-3 |",
        "- `style.pt`",
    ):
        assert expected in loaded.text, expected
    local = model_card("style", str(tmp_path), "Trained.", [], {}, files)
    assert local.data.base_model is None, "a local folder is no Hub model id"
    assert str(tmp_path) not in local.text
    assert f'from_pretrained("BASE_MODEL")  # BASE_MODEL: {tmp_path.name}\'s Hub id or folder' in local.text
    # The clients the card names agree with the README's table: Forge loads a hypernetwork and never applies it.
    assert (
        "**AUTOMATIC1111 webui:**" in loaded.text
        and "Forge and reForge list and load the file but never apply" in (loaded.text.replace("\n", " "))
    )


def test_a_push_uploads_shareable_settings_and_no_optimizer_state_unless_asked(tmp_path, monkeypatch):
    import json

    import huggingface_hub

    from hypernet.publishing import push_folder

    run = tmp_path / "run"
    (run / "images").mkdir(parents=True)
    (run / "style.pt").write_bytes(b"pt")
    (run / "style.pt.optim").write_bytes(b"optim")
    (run / "images" / "style-10.png").write_bytes(b"png")
    settings = {
        "pretrained_model_name_or_path": "/home/me/models/sd15",
        "train_data_dir": str(tmp_path / "data"),
        "output_dir": str(run),
        "template_file": str(run / "images"),
        "preview_prompt": ["a cat", "/srv/secret/path"],
        "learning_rate": "5e-3",
        "pretrained_vae_model_name_or_path": None,
    }
    (run / "training_settings.json").write_text(json.dumps(settings))
    uploaded = {}

    def fake_upload_folder(repo_id, folder_path, commit_message, ignore_patterns, token):
        for root, _, names in os.walk(folder_path):
            for name in names:
                with open(os.path.join(root, name), "rb") as f:
                    uploaded[os.path.relpath(os.path.join(root, name), folder_path)] = f.read()

    monkeypatch.setattr(huggingface_hub, "upload_folder", fake_upload_folder)
    push_folder("me/style", run)
    assert sorted(uploaded) == ["images/style-10.png", "style.pt", "training_settings.json"]
    shared = json.loads(uploaded["training_settings.json"])
    assert shared == {
        "pretrained_model_name_or_path": "sd15",
        "train_data_dir": "data",
        "output_dir": ".",
        "template_file": "images",
        "preview_prompt": ["a cat", "path"],
        "learning_rate": "5e-3",
        "pretrained_vae_model_name_or_path": None,
    }
    assert str(tmp_path) not in uploaded["training_settings.json"].decode()
    uploaded.clear()
    push_folder("me/style", run, optimizer_state=True)
    assert uploaded["style.pt.optim"] == b"optim"
