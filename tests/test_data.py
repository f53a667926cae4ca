"""The data pipeline: the record store (sharded encoding, on disk, verified), lazy datasets, DataLoader workers."""

import itertools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, train
from PIL import Image
from records_worker import records_as_dict

import hypernet
from hypernet import data, errors
from hypernet.prompts import PromptEncoder
from hypernet.training import load_models


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    return load_models(tiny_model_dir)


def encoders_of(models, vae_id="tiny"):
    prompt_encoder = PromptEncoder(models.tokenizers, models.text_encoders)
    return data.Encoders(models.vae, prompt_encoder, "cpu", torch.float32, vae_id=vae_id, text_id="tiny")


SETTINGS = data.DataSettings(name="n", resolution=64, random_flip=True, latent_sampling_method="once", seed=4)


def assert_same_records(expected, actual):
    """Two records_as_dict results: the same tensors, bit for bit, and the same fields."""
    (tensors, fields), (other_tensors, other_fields) = expected, actual
    assert fields == other_fields
    assert list(tensors) == list(other_tensors)
    for name in tensors:
        assert torch.equal(tensors[name], other_tensors[name]), name


def records_equal(a, b):
    assert_same_records(records_as_dict(a), records_as_dict(b))


def test_warm_store_encodes_nothing_and_gives_the_same_records(models, small_dataset, tmp_path):
    entries = data.folder_entries(small_dataset)
    cold, warm = encoders_of(models), encoders_of(models)
    first, _ = data.prepare_records(entries, ["[filewords]"], SETTINGS, cold, str(tmp_path / "cache"))
    second, _ = data.prepare_records(entries, ["[filewords]"], SETTINGS, warm, str(tmp_path / "cache"))
    assert (cold.vae_calls, cold.prompt_calls) == (8, 8) and (warm.vae_calls, warm.prompt_calls) == (0, 0)
    assert first.folder == second.folder, "the same index"
    records_equal(first, second)
    other, _ = data.prepare_records(entries, ["[filewords]"], SETTINGS, encoders_of(models), str(tmp_path / "other"))
    records_equal(first, other)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def write(path, content):
    with open(path, "wb") as f:
        f.write(content)


def cache_files(directory, kind="latents"):
    """The store's entry files of one kind."""
    top = os.path.join(directory, data.RecordStore.KINDS[kind])
    return sorted(
        os.path.join(top, d, f) for d in os.listdir(top) if len(d) == 2 for f in os.listdir(os.path.join(top, d))
    )


def test_a_damaged_entry_is_encoded_again_with_a_warning(models, small_dataset, tmp_path):
    entries = data.folder_entries(small_dataset)
    cache = str(tmp_path / "cache")
    first, _ = data.prepare_records(entries, ["[filewords]"], SETTINGS, encoders_of(models), cache)
    files = cache_files(cache)
    good = read(files[3])
    damaged = bytearray(good)
    damaged[-5] ^= 0xFF  # a flipped bit in the tensor data: the checksum no longer matches
    write(files[3], bytes(damaged))
    write(files[5], read(files[5])[:100])  # truncated
    encoders = encoders_of(models)
    prompt = cache_files(cache, "prompts")[0]
    write(prompt, read(prompt)[:-3])
    with pytest.warns(UserWarning, match="record store entry .* is damaged .*; encoding it again"):
        second, corrupt = data.prepare_records(entries, ["[filewords]"], SETTINGS, encoders, cache)
    assert encoders.vae_calls == 2 and encoders.prompt_calls == 1 and corrupt == 3
    records_equal(first, second)
    assert read(files[3]) == good, "rewritten whole"


def test_an_entry_damaged_during_training_is_never_trained_on(models, small_dataset, tmp_path):
    cache = str(tmp_path / "cache")
    records, _ = data.prepare_records(
        data.folder_entries(small_dataset), ["[filewords]"], SETTINGS, encoders_of(models), cache
    )
    samples = data.TrainingSamples(records, ["[filewords]"], SETTINGS)
    path = records.store.path("latents", bytes(records.rows[2]["latents"]))
    damaged = bytearray(read(path))
    damaged[-1] ^= 1
    write(path, bytes(damaged))
    with pytest.raises(errors.UsageError, match=r"record store entry .* was damaged during training .*; run again"):
        samples.__getitems__([(0, 2)])


def test_a_changed_image_or_setting_encodes_just_what_changed(models, small_dataset, tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(small_dataset, folder)
    cache = str(tmp_path / "cache")
    data.prepare_records(data.folder_entries(str(folder)), ["[filewords]"], SETTINGS, encoders_of(models), cache)
    name = sorted(n for n in os.listdir(folder) if n.endswith(".png"))[2]
    Image.open(folder / name).rotate(90).save(folder / name)
    encoders = encoders_of(models)
    data.prepare_records(data.folder_entries(str(folder)), ["[filewords]"], SETTINGS, encoders, cache)
    assert encoders.vae_calls == 1
    for changed in (data.DataSettings(**{**SETTINGS.__dict__, "resolution": 128}), SETTINGS):
        encoders = encoders_of(models)
        data.prepare_records(data.folder_entries(str(folder)), ["[filewords]"], changed, encoders, cache)
        assert encoders.vae_calls == (8 if changed.resolution == 128 else 0)
    other_vae = encoders_of(models, vae_id="x")
    data.prepare_records(data.folder_entries(str(folder)), ["[filewords]"], SETTINGS, other_vae, cache)
    assert other_vae.vae_calls == 8, "another VAE's latents are other entries"


def test_dataloader_workers_give_the_same_batches(models, small_dataset, tmp_path):
    settings = data.DataSettings(
        name="n",
        resolution=64,
        random_flip=True,
        latent_sampling_method="random",
        shuffle_tags=True,
        tag_drop_out=0.3,
        use_weight=True,
        seed=2,
    )
    template = ["a [filewords] by [name]", "[filewords], art"]
    records, _ = data.prepare_records(
        data.folder_entries(small_dataset), template, settings, encoders_of(models), str(tmp_path / "store")
    )
    batches = {}
    for workers in (0, 2):
        sampler = data.EpochBatchSampler(records.sizes(), 3, seed=2, chunks=records.chunk_counts())
        loader = torch.utils.data.DataLoader(
            data.TrainingSamples(records, template, settings),
            batch_sampler=sampler,
            collate_fn=data.collate,
            num_workers=workers,
        )
        batches[workers] = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            batches[workers] += list(loader)
    assert len(batches[0]) == 2 * 3
    for a, b in zip(batches[0], batches[2]):
        assert a["keys"] == b["keys"] and a["prompts"] == b["prompts"] and a["chunks"] == b["chunks"] == 1
        for key in ("latents", "weight", "time_ids"):
            assert torch.equal(a[key], b[key]), key
    assert batches[0][0]["prompts"] != batches[0][3]["prompts"], "tags reshuffled in the next epoch"


def test_datasets_are_read_lazily(tmp_path):
    import datasets

    rows = {"image": [], "text": []}
    for i in range(5):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (16 + i, 16), (i * 40, 0, 0)).save(path)
        rows["image"].append(str(path))
        rows["text"].append(f"thing {i}")
    dataset = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    dataset.save_to_disk(str(tmp_path / "arrow"))
    entries = data.dataset_entries(str(tmp_path / "arrow"))
    assert len(entries) == 5 and entries.caption(3) == "thing 3"
    assert entries.image(4).size == (20, 16)
    assert entries.raw(2) == (tmp_path / "2.png").read_bytes(), "the file's bytes, not a decoded copy"
    with pytest.raises(errors.ArgumentError, match=r"^dataset_name .*nowhere/at-all: cannot be loaded") as raised:
        data.dataset_entries(str(tmp_path / "nowhere" / "at-all"))
    assert raised.value.argument == "dataset_name"
    assert str(raised.value.about("--dataset_name")).startswith(f"--dataset_name {tmp_path}/nowhere/at-all: cannot")
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "metadata.jsonl").write_text("")
    with pytest.raises(errors.ArgumentError, match=r"^dataset_name .*empty: (cannot be loaded|the dataset is empty)"):
        data.dataset_entries(str(tmp_path / "empty"))


def test_file_hashes_are_cached_by_size_and_time(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERNET_CACHE_DIR", str(tmp_path / "hashes"))
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x" * 1000)
    first = hypernet.hashing.cached_sha256(path)
    reads = []
    real_open = open

    def counting_open(file, *args, **kwargs):
        if os.fspath(file) == os.path.realpath(path):
            reads.append(1)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
    assert hypernet.hashing.cached_sha256(path) == first and reads == [], "cached: the file is not read again"
    path.write_bytes(b"y" * 1001)
    assert hypernet.hashing.cached_sha256(path) != first and reads == [1]
    cache = json.load(real_open(tmp_path / "hashes" / "hashes.json"))
    assert cache[os.path.realpath(path)]["size"] == 1001


def torchrun(processes, port, script, *argv):
    """`script` under torchrun with `processes` processes on one core each (the same arithmetic in each process,
    whatever their number: the thread count can change a convolution's rounding)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_port",
        str(port),
        os.path.join(ROOT, script),
        *map(str, argv),
    ]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_processes_cache_the_same_latents_as_one(tiny_model_dir, small_dataset, tmp_path):
    flags = [
        "--random_flip",
        "--save_every",
        0,
        "--max_train_steps",
        2,
        "--hypernetwork_name",
        "x",
        "--pretrained_model_name_or_path",
        tiny_model_dir,
        "--train_data_dir",
        small_dataset,
        "--resolution",
        64,
        "--preview_every",
        0,
        "--checkpointing_steps",
        0,
    ]
    for processes in (1, 2):
        result = torchrun(
            processes,
            29630 + processes,
            "train_hypernetwork.py",
            *flags,
            "--output_dir",
            tmp_path / f"out{processes}",
            "--cache_dir",
            tmp_path / f"cache{processes}",
        )
        assert result.returncode == 0, result.stderr[-3000:]
    for kind in ("latents", "prompts"):
        one, two = cache_files(tmp_path / "cache1", kind), cache_files(tmp_path / "cache2", kind)
        assert len(one) == 8 and [os.path.basename(f) for f in one] == [os.path.basename(f) for f in two]
        assert all(read(a) == read(b) for a, b in zip(one, two)), "bit for bit"
    (one,), (two,) = (os.listdir(tmp_path / f"cache{n}" / "index") for n in (1, 2))
    assert one == two, "the same index"


def test_mapped_texts_give_back_each_string(tmp_path):
    strings = ["", "a red fox", "", "ß, é, 狐", "tags, with, commas\nand a newline", ""]
    data.write_texts(str(tmp_path), "t", strings)
    texts = data.read_texts(str(tmp_path), "t", "r")
    assert len(texts) == 6 and [texts[i] for i in range(6)] == strings


VARIED = dict(
    name="n", resolution=64, random_flip=True, varsize=True, use_weight=True, latent_sampling_method="random", seed=3
)


def make_varied_dataset(folder, count=40):
    """`count` images of three sizes, every fifth with alpha, as a folder and as a Parquet dataset of the same rows."""
    os.makedirs(folder / "images")
    rng = np.random.default_rng(7)
    rows = {"image": [], "text": []}
    for i in range(count):
        width, height = [(64, 64), (128, 64), (64, 128)][i % 3]
        mode = "RGBA" if i % 5 == 0 else "RGB"
        path = folder / "images" / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, len(mode)), dtype=np.uint8), mode).save(path)
        caption = f"thing {i}, noise, {'é' if i % 2 else 'ß'}"
        path.with_suffix(".txt").write_text(caption)
        rows["image"].append(str(path))
        rows["text"].append(caption)
    import datasets

    os.makedirs(folder / "parquet")
    dataset = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    dataset.to_parquet(str(folder / "parquet" / "train.parquet"))
    return str(folder / "images"), str(folder / "parquet")


@pytest.fixture(scope="module")
def varied_dataset(tmp_path_factory):
    return make_varied_dataset(tmp_path_factory.mktemp("varied"))


def test_a_streamed_dataset_gives_the_records_of_the_folder(models, varied_dataset):
    images, parquet = varied_dataset
    settings = data.DataSettings(**VARIED)
    template = ["[filewords], [name]"]
    expected, _ = data.prepare_records(data.folder_entries(images), template, settings, encoders_of(models))
    entries = data.dataset_entries(parquet, streaming=True)
    assert entries.streamed and not hasattr(entries, "__len__") and entries.shards == 1
    streamed, _ = data.prepare_records(entries, template, settings, encoders_of(models))
    assert len(streamed) == 40 and len({r.size for r in streamed}) == 3
    assert streamed[7].caption == "thing 7, noise, é" and streamed[5].weight.shape == streamed[5].means.shape[1:]
    records_equal(expected, streamed)


def test_a_bad_image_in_a_stream_is_named_by_row(models, tmp_path):
    import datasets

    good = io_png(Image.new("RGB", (64, 64), (10, 20, 30)))
    rows = {
        "image": [{"bytes": good, "path": None}] * 20 + [{"bytes": b"not a png", "path": None}],
        "text": ["x"] * 21,
    }
    os.makedirs(tmp_path / "parquet")
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).to_parquet(
        str(tmp_path / "parquet" / "train.parquet")
    )
    entries = data.dataset_entries(str(tmp_path / "parquet"), streaming=True)
    with pytest.raises(errors.UsageError, match=r"parquet row 20: unreadable image"):
        data.prepare_records(entries, ["[filewords]"], SETTINGS, encoders_of(models))
    with pytest.raises(
        errors.ArgumentError, match=r"^caption_column 'caption': .*parquet has no such column; it has image, text"
    ):
        data.dataset_entries(str(tmp_path / "parquet"), streaming=True, caption_column="caption")


def io_png(image):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_training_on_a_stream(tiny_model_dir, varied_dataset, tmp_path):
    _, parquet = varied_dataset
    out = tmp_path / "streamed"
    assert (
        train(
            tiny_model_dir,
            None,
            out,
            "--dataset_name",
            parquet,
            "--streaming",
            "--hypernetwork_name",
            "s",
            "--varsize",
            steps=2,
        )
        == 0
    )
    settings = json.load(open(out / "training_settings.json"))
    assert settings["dataset_size"] == 40 and hypernet.load(out / "s.pt").config.step == 2


def make_sharded_parquet(folder, images, shards=4):
    """The varied dataset's rows in `shards` Parquet files: a stream of that many shards."""
    import datasets

    names = sorted(n for n in os.listdir(images) if n.endswith(".png"))
    rows = {
        "image": [os.path.join(images, n) for n in names],
        "text": [open(os.path.join(images, n[:-4] + ".txt")).read() for n in names],
    }
    dataset = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    os.makedirs(folder)
    for shard in range(shards):
        dataset.shard(shards, shard, contiguous=True).to_parquet(os.path.join(folder, f"train-{shard}.parquet"))
    return str(folder)


def test_a_sharded_stream_is_keyed_by_shard_and_row(models, varied_dataset, tmp_path):
    images, _ = varied_dataset
    sharded = make_sharded_parquet(tmp_path / "sharded", images)
    entries = data.dataset_entries(sharded, streaming=True)
    assert entries.shards == 4
    mine = [[(e.shard, e.row) for e in chunk] for chunk in entries.chunks(1, 2)]
    assert {shard for chunk in mine for shard, _ in chunk} == {1, 3}, "process 1 of 2 reads shards 1 and 3 alone"
    records, _ = data.prepare_records(
        entries, ["[filewords]"], data.DataSettings(**VARIED), encoders_of(models), str(tmp_path / "store")
    )
    assert len(records) == 40 and records.rows["shard"].tolist() == [s for s in range(4) for _ in range(10)]
    assert records.rows["row"].tolist() == list(range(10)) * 4


@pytest.mark.slow
def test_two_processes_hold_the_records_of_one(tiny_model_dir, varied_dataset, tmp_path):
    images, parquet = varied_dataset
    sharded = make_sharded_parquet(tmp_path / "sharded", images)
    broken = tmp_path / "broken"
    shutil.copytree(images, broken)
    (broken / "020.png").write_bytes(b"not a png")  # in the second chunk: the second process's
    port = itertools.count(29641)
    for n, (source, extra) in enumerate(
        [(images, []), (parquet, ["--streaming"]), (sharded, ["--streaming"]), (str(broken), [])]
    ):
        saved = {}
        for processes in (1, 2) if source != str(broken) else (2,):
            out = tmp_path / f"records{n}-{processes}"
            result = torchrun(
                processes,
                next(port),
                "tests/records_worker.py",
                tiny_model_dir,
                source,
                out,
                json.dumps(VARIED),
                tmp_path / f"store{n}-{processes}",
                *extra,
            )
            if source == str(broken):
                assert result.returncode != 0
                assert result.stderr.count("error: ") == 2 and result.stderr.count("020.png: unreadable image") == 2
                continue
            assert result.returncode == 0, result.stderr[-3000:]
            saved[processes] = [torch.load(f"{out}.{rank}") for rank in range(processes)]
        if source == str(broken):
            continue
        (one,) = saved[1]
        assert len(one["fields"]) == 40
        for two in saved[2]:
            assert_same_records((one["tensors"], one["fields"]), (two["tensors"], two["fields"]))
            assert os.path.basename(two["index"]) == os.path.basename(one["index"]), "the same index, bit for bit"


def test_spread_takes_images_evenly_over_a_folder_and_the_first_of_a_stream(varied_dataset):
    images, parquet = varied_dataset
    folder = data.folder_entries(images)
    spread = list(folder.spread(8))
    expected = [i * 40 // 8 for i in range(8)]
    assert [caption for _, caption in spread] == [folder.caption(i) for i in expected]
    assert all(
        np.array_equal(np.asarray(image), np.asarray(folder.image(i))) for (image, _), i in zip(spread, expected)
    )
    assert len(list(folder.spread(100))) == 40
    streamed = list(data.dataset_entries(parquet, streaming=True).spread(3))
    assert [caption for _, caption in streamed] == [folder.caption(i) for i in range(3)]
    assert all(image.mode == "RGB" for image, _ in streamed)
