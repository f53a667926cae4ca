"""What training is fed against what the webui's own code computes on the same files (tests/data/webui_data, made
by its dataset.py and learn_schedule.py: README.md there): pixels, loss weights, which files train, template lines,
learning rates per step and the step training ends at."""

import json
import os
import re

import numpy as np
import pytest
import torch
from helpers import ROOT, run_script
from PIL import Image
from safetensors.torch import load_file

from hypernet import data, training

HERE = os.path.join(ROOT, "tests", "data", "webui_data")
FIXTURES = json.load(open(os.path.join(HERE, "fixtures.json"), encoding="utf-8"))
TENSORS = load_file(os.path.join(HERE, "fixtures.safetensors"))
FLAGS = {"square_64": ["--resolution", "64"], "wide_96x64": ["--resolution", "96,64"], "varsize": ["--varsize"]}


@pytest.fixture(scope="module")
def debug_runs(tiny_model_dir, tmp_path_factory):
    """--debug_dataset of each fixture configuration: {name: folder}."""
    folders = {}
    for name, flags in FLAGS.items():
        folder = tmp_path_factory.mktemp(name)
        code = run_script(
            "train_hypernetwork.py",
            "--pretrained_model_name_or_path",
            tiny_model_dir,
            "--train_data_dir",
            os.path.join(HERE, "images"),
            "--output_dir",
            str(folder / "run"),
            "--template_file",
            os.path.join(HERE, "template.txt"),
            "--hypernetwork_name",
            "fixture-style",
            "--use_weight",
            "--debug_dataset",
            str(folder / "debug"),
            *flags,
        )
        assert code == 0
        folders[name] = folder / "debug"
    return folders


def trained(name):
    return {os.path.splitext(t["file"])[0]: t for t in FIXTURES["datasets"][name]["trained"]}


@pytest.mark.parametrize("name", list(FLAGS))
def test_the_same_files_train_as_in_the_webui(debug_runs, name):
    written = {n[: -len(".png")] for n in os.listdir(debug_runs[name]) if n.endswith(".png")}
    assert written == set(trained(name)), "every file PIL opens trains (.gif, .tiff), and nothing else"
    assert {"07-anim", "08-scan"} <= written


@pytest.mark.parametrize("name", list(FLAGS))
def test_pixels_equal_the_webuis(debug_runs, name):
    for stem, entry in trained(name).items():
        webui = TENSORS[f"{name}/{entry['file']}/pixels"].numpy()
        ours = np.asarray(Image.open(debug_runs[name] / f"{stem}.png"), dtype=np.float64)
        ours = (ours / 127.5 - 1.0).astype(np.float32).transpose(2, 0, 1)
        assert ours.shape == webui.shape, stem
        assert np.array_equal(ours, webui), f"{name}/{stem}: pixels differ by {np.abs(ours - webui).max()}"


@pytest.mark.parametrize("name", list(FLAGS))
def test_loss_weights_equal_the_webuis_where_it_is_right(debug_runs, name):
    for stem, entry in trained(name).items():
        webui = TENSORS[f"{name}/{entry['file']}/weight"].numpy()
        ours = np.load(debug_runs[name] / f"{stem}.weight.npy")
        assert ours.dtype == np.float32 and ours.shape == webui.shape, stem
        channels, height, width = ours.shape
        if height == width or np.all(webui == 1):
            np.testing.assert_allclose(ours, webui, rtol=1e-6, atol=1e-6, err_msg=f"{name}/{stem}")
            continue
        # The webui resizes the alpha to (height, width) as PIL's (width, height) and reshapes the transposed map:
        # its map is the true one's transpose, read in the wrong order. Ours is the alpha at latent size.
        with Image.open(os.path.join(HERE, "images", entry["file"])) as image:
            alpha = image.getchannel("A")
            truth = np.asarray(alpha.resize((width, height), Image.BICUBIC), dtype=np.float32)
            webuis = np.asarray(alpha.resize((height, width), Image.BICUBIC), dtype=np.float32).reshape(height, width)
        truth, webuis = truth - truth.min(), webuis - webuis.min()
        np.testing.assert_allclose(ours[0], truth / truth.mean(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(webui[0], webuis / webuis.mean(), rtol=1e-6, atol=1e-6)
        assert not np.allclose(ours, webui), f"{name}/{stem}: the webui's map is transposed"


def test_captions_and_prompts_are_the_webuis(debug_runs):
    entries = data.folder_entries(os.path.join(HERE, "images"))
    captions = {
        os.path.splitext(os.path.basename(entries.label(i)))[0]: entries.caption(i) for i in range(len(entries))
    }
    template = data.load_template(os.path.join(HERE, "template.txt"))
    for stem, entry in trained("square_64").items():
        assert captions[stem] == entry["caption"].strip(), "the webui's [filewords]: the .txt, else the file's words"
        prompt = (debug_runs["square_64"] / f"{stem}.txt").read_text(encoding="utf-8").rstrip("\n")
        filled = {line.replace("[filewords]", captions[stem]).replace("[name]", "fixture-style") for line in template}
        assert prompt in filled


def test_template_lines_are_read_as_the_webui_reads_them():
    lines = data.load_template(os.path.join(HERE, "template.txt"))
    assert lines == FIXTURES["template_lines"], (
        "repeats weigh the draw and blank lines are candidates, as in the webui"
    )
    assert lines.count("") == 1 and len(lines) == 5


@pytest.mark.parametrize(
    "case", FIXTURES["schedules"], ids=lambda c: f"{c['text']}@{c['max_steps']}+{c['initial_step']}"
)
def test_schedule_rates_and_stop_step_equal_the_webuis(case):
    schedule = training.parse_schedule(case["text"], "--learning_rate")
    end = training.schedule_end(schedule)
    stop = case["max_steps"] if end is None else min(end, case["max_steps"])
    assert stop == case["stop_step"]
    rates = [training.rate_at(schedule, step) for step in range(case["initial_step"], stop)]
    assert rates == case["rates"]


def test_the_fixture_images_are_the_ones_the_fixtures_were_made_from():
    """make_fixtures.py draws the images; the shipped ones are those it drew (their pixels match the fixtures)."""
    for entry in FIXTURES["datasets"]["varsize"]["trained"]:
        with Image.open(os.path.join(HERE, "images", entry["file"])) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float64) / 127.5 - 1.0
        expected = TENSORS[f"varsize/{entry['file']}/pixels"].numpy().transpose(1, 2, 0)
        assert np.array_equal(pixels.astype(np.float32), expected), entry["file"]


BUCKETS = json.load(open(os.path.join(ROOT, "tests", "data", "kohya_buckets", "fixtures.json"), encoding="utf-8"))


@pytest.mark.parametrize("case", BUCKETS["cases"], ids=lambda c: f"{c['image_size']}-{c['resolution']}")
def test_buckets_are_kohyas(case):
    settings = data.DataSettings(
        name="x",
        resolution=tuple(case["resolution"]),
        image_fit="bucket",
        min_bucket_reso=case["min_bucket_reso"],
        max_bucket_reso=case["max_bucket_reso"],
        bucket_reso_steps=case["bucket_reso_steps"],
        bucket_no_upscale=case["bucket_no_upscale"],
    )
    bucket, scaled = data.select_bucket(tuple(case["image_size"]), settings)
    assert (list(bucket), list(scaled)) == (case["bucket"], case["resized_size"])
    placement = data.place(tuple(case["image_size"]), settings, torch.Generator().manual_seed(0))
    assert placement.size == bucket and placement.scaled == scaled
    assert 0 <= placement.left <= scaled[0] - bucket[0] and 0 <= placement.top <= scaled[1] - bucket[1]


def write_images(folder, sizes):
    folder.mkdir(parents=True, exist_ok=True)
    for n, size in enumerate(sizes):
        Image.effect_noise(size, 40 + n).convert("RGB").save(folder / f"{n:02d}-shape.png")
    return str(folder)


SIZES = [(100, 60), (60, 100), (80, 80), (120, 64), (64, 64), (90, 50), (50, 90), (70, 72)]


@pytest.mark.parametrize("no_upscale, buckets", [(False, 3), (True, 5)])
def test_bucket_batches_hold_one_size_each(tiny_model_dir, tmp_path, no_upscale, buckets):
    from hypernet.prompts import PromptEncoder

    models = training.load_models(tiny_model_dir)
    encoders = data.Encoders(models.vae, PromptEncoder(models.tokenizers, models.text_encoders), "cpu", torch.float32)
    settings = data.DataSettings(
        name="b",
        resolution=64,
        image_fit="bucket",
        min_bucket_reso=32,
        max_bucket_reso=128,
        bucket_reso_steps=8,
        bucket_no_upscale=no_upscale,
    )
    entries = data.folder_entries(write_images(tmp_path / "images", SIZES))
    records, _ = data.prepare_records(entries, ["[filewords]"], settings, encoders, str(tmp_path / "store"))
    sizes = [tuple(s) for s in records.sizes().tolist()]
    assert len(set(sizes)) == buckets, "images of other proportions land in other buckets"
    for (width, height), size in zip(SIZES, sizes):
        assert size == data.select_bucket((width, height), settings)[0]
        assert abs(size[0] / size[1] - width / height) < 0.25
    sampler = data.EpochBatchSampler(records.sizes(), 2, 0, records.chunk_counts())
    samples = data.TrainingSamples(records, ["[filewords]"], settings)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for batch in sampler:
            assert len({sizes[index] for _, index in batch}) == 1
            latents = samples.__getitems__(batch)["latents"]
            assert latents.shape[-2:] == (sizes[batch[0][1]][1] // 8, sizes[batch[0][1]][0] // 8)


def test_training_logs_the_fit_and_stops_where_the_schedule_ends(tiny_model_dir, tmp_path, caplog):
    from helpers import train

    images = write_images(tmp_path / "images", SIZES)
    caplog.set_level("INFO")
    assert train(tiny_model_dir, images, tmp_path / "s", "--learning_rate", "1e-3:2, 1e-4:3", steps=6) == 0
    assert "images are not of the training size's proportions (64x64) and are stretched to it" in caplog.text
    assert "the --learning_rate schedule ends at step 3: training stops there, as in the webui" in caplog.text
    assert json.loads((tmp_path / "s" / "training_settings.json").read_text())["max_train_steps"] == 3
    assert [line.split(",")[0] for line in (tmp_path / "s" / "loss.csv").read_text().splitlines()[1:]] == [
        "1",
        "2",
        "3",
    ]
    caplog.clear()
    flags = [
        "--image_fit",
        "bucket",
        "--min_bucket_reso",
        "32",
        "--max_bucket_reso",
        "128",
        "--bucket_reso_steps",
        "8",
    ]
    assert train(tiny_model_dir, images, tmp_path / "b", *flags, steps=2) == 0
    assert re.search(r"\d+ bucket\(s\) of width x height: images: \d+x\d+: \d+", caplog.text)
    settings = json.loads((tmp_path / "b" / "training_settings.json").read_text())
    assert settings["optimizer_settings"]["weight_decay"] == 0.01 and settings["image_fit"] == "bucket"


def test_resuming_a_file_keeps_its_name(tiny_model_dir, small_dataset, tmp_path):
    from helpers import train

    assert train(tiny_model_dir, small_dataset, tmp_path / "first", "--hypernetwork_name", "inky", steps=1) == 0
    resumed = tmp_path / "elsewhere"
    assert (
        train(tiny_model_dir, small_dataset, resumed, "--resume_hypernetwork", tmp_path / "first" / "inky.pt", steps=2)
        == 0
    )
    assert (resumed / "inky.pt").is_file() and not (resumed / "elsewhere.pt").exists()
    import hypernet

    assert hypernet.load(str(resumed / "inky.pt")).config.name == "inky"
