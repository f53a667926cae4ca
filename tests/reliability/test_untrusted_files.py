"""Untrusted and damaged files: refused or ignored with a clear message, no code run, nothing written."""

import errno
import json
import os
import shutil
import struct
import warnings

import pytest
import torch
from helpers import a1111_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hypernet
from hypernet.errors import HypernetError


def forged_safetensors(path, header, data=b""):
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


META = {"format": "hypernet.a1111", "format_version": "1", "widths": "[4]"}
# Every tensor a [1, 2, 1] width-4 hypernetwork needs, with data offsets past the end of the file.
LYING_OFFSETS = {"__metadata__": META} | {
    f"4.{side}.linear.{name}": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4096]}
    for side in "kv"
    for name, shape in (("0.weight", [8, 4]), ("0.bias", [8]), ("1.weight", [4, 8]), ("1.bias", [4]))
}


@pytest.mark.parametrize(
    "header, data, message",
    [
        (
            {"__metadata__": META, "4.k.linear.0.weight": {"dtype": "F32", "shape": [8, 4], "data_offsets": [0, 128]}},
            b"\0" * 16,
            "weights do not fit its settings",
        ),
        (
            {
                "__metadata__": META,
                "4.k.linear.0.weight": {"dtype": "F32", "shape": [10**9, 10**9], "data_offsets": [0, 16]},
            },
            b"\0" * 16,
            "weights do not fit its settings",
        ),
        (
            {"__metadata__": META, "4.k.linear.0.weight": {"dtype": "Q99", "shape": [2], "data_offsets": [0, 8]}},
            b"\0" * 8,
            "tensor 4.k.linear.0.weight is not float16/32/64 or bfloat16",
        ),
        ({"__metadata__": dict(META, widths="[4, 'x']")}, b"", "corrupted"),
        (LYING_OFFSETS, b"\0" * 64, "corrupted safetensors file"),
        ({"__metadata__": {"format": "lora"}}, b"", "not a hypernet safetensors file"),
    ],
)
def test_forged_safetensors_headers_are_refused(tmp_path, header, data, message):
    forged_safetensors(tmp_path / "f.safetensors", header, data)
    with pytest.raises(hypernet.FormatError, match=message) as info:
        hypernet.load(tmp_path / "f.safetensors")
    assert str(tmp_path / "f.safetensors") in str(info.value)


def test_duplicate_keys_and_widths_are_refused_by_name(tmp_path):
    path = tmp_path / "d.safetensors"
    hypernet.save(hypernet.Hypernetwork([4, 8], name="d"), path)
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        raw, data = f.read(length).decode(), f.read()
    cases = [
        (
            raw.replace('"__metadata__":{', '"__metadata__":{"format":"x",', 1),
            r"corrupted safetensors header \(the key 'format' appears twice\)",
        ),
        (
            raw.replace('"widths":"[4,8]"', '"widths":"[4,4,8]"').replace('"widths":"[4, 8]"', '"widths":"[4, 4, 8]"'),
            r"corrupted metadata: widths lists 4 twice",
        ),
        (
            raw.replace(
                '"pt_legacy_layout":', '"pt_extra":' + json.dumps('{"a": 1, "a": 2}') + ',"pt_legacy_layout":'
            ),
            r"corrupted metadata: pt_extra has the key 'a' twice",
        ),
    ]
    for forged, message in cases:
        assert forged != raw, message
        encoded = forged.encode()
        path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
        with pytest.raises(hypernet.FormatError, match=message) as info:
            hypernet.load(path)
        assert str(info.value).startswith(f"{path}: ")


def test_huge_header_length_is_refused_before_reading(tmp_path):
    with open(tmp_path / "h.safetensors", "wb") as f:
        f.write(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(
        hypernet.FormatError, match=r"corrupted safetensors header \(it claims 4611686018427387904 bytes"
    ):
        hypernet.load(tmp_path / "h.safetensors")


def test_optim_with_a_pickle_payload_is_ignored_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(a1111_file("case1_default_relu"), "c.pt")

    class Payload:
        def __reduce__(self):
            return (open, ("PWNED_OPTIM", "w"))

    torch.save({"hash": hypernet.shorthash("c.pt"), "optimizer_state_dict": Payload()}, "c.pt.optim")
    with pytest.warns(UserWarning, match="ignoring optimizer state: c.pt.optim: refused"):
        hn_file = hypernet.read("c.pt", optimizer_state=True)
    assert hn_file.optimizer is None and not os.path.exists("PWNED_OPTIM")


def test_disk_full_while_saving_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "keep.pt"
    hypernet.save(hypernet.load(a1111_file("case1_default_relu")), path)
    before = path.read_bytes()

    def full_disk(obj, tmp, path):
        with open(tmp, "wb") as handle:
            handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hypernet.formats, "torch_save_for_webui", full_disk)
    with pytest.raises(
        HypernetError,
        match=r"keep.pt: could not write \(no space left on the device: [\d.]+ MiB free\); the previous file, if any, is intact",
    ):
        hypernet.save(hypernet.load(a1111_file("case8_with_optim")), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.pt"], "the temporary file is removed"


def test_disk_full_during_training_is_one_clear_error(tiny_model_dir, small_dataset, tmp_path, monkeypatch, capsys):
    from helpers import train

    real_save = hypernet.formats.torch_save_for_webui

    def full_disk_for_final(obj, tmp, path):
        if os.path.basename(path) == "x.pt":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, tmp, path)

    monkeypatch.setattr(hypernet.formats, "torch_save_for_webui", full_disk_for_final)
    assert (
        train(tiny_model_dir, small_dataset, tmp_path / "o", "--hypernetwork_name", "x", "--save_every", 2, steps=2)
        == 2
    )
    assert "x.pt: could not write (no space left on the device: " in capsys.readouterr().err
    assert hypernet.load(tmp_path / "o" / "hypernetworks" / "x-2.pt").config.step == 2


SEEDS = [a1111_file(c) for c in ("case1_default_relu", "case7_old_format")]


def load_quietly(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            hypernet.load(path)
        except HypernetError:
            pass


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.binary(max_size=4096), suffix=st.sampled_from([".pt", ".safetensors"]))
def test_fuzz_random_bytes_give_only_our_errors(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("fuzz") / ("f" + suffix)
    path.write_bytes(data)
    load_quietly(path)


@pytest.fixture(scope="module")
def seed_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("seeds")
    files = []
    for source in SEEDS:
        hn = hypernet.load(source)
        for suffix in (".pt", ".safetensors"):
            path = directory / (os.path.basename(source)[:-3] + suffix)
            hypernet.save(hn, path)
            files.append(path.read_bytes())
    return files


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    which=st.integers(0, 3),
    edits=st.lists(st.tuples(st.integers(0, 10**7), st.integers(0, 255)), max_size=8),
    cut=st.one_of(st.none(), st.integers(0, 10**7)),
)
def test_fuzz_mutated_real_files_give_only_our_errors(tmp_path_factory, seed_files, which, edits, cut):
    data = bytearray(seed_files[which])
    for position, value in edits:
        data[position % len(data)] = value
    if cut is not None:
        data = data[: cut % len(data)]
    path = tmp_path_factory.mktemp("mut") / ("f.pt" if which % 2 == 0 else "f.safetensors")
    path.write_bytes(bytes(data))
    load_quietly(path)
