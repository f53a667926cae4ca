"""Hostile and careless inputs to hypernet.load, convert.py and generate.py: each case ends in one line naming the
file or flag (or in correct work), within bounded time and memory, and nothing outside --hypernetwork_dir is read."""

import os
import resource
import shutil
import sys
import time
import zipfile

import pytest
import torch
from helpers import a1111_file, read_only_folder, run_script
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import hypernet
from hypernet.errors import HypernetError


def base_dict():
    return torch.load(a1111_file("case1_default_relu"), weights_only=True)


def refused(path, match, optimizer_state=False):
    start = time.perf_counter()
    with pytest.raises(hypernet.FormatError, match=match) as info:
        hypernet.read(path, optimizer_state=optimizer_state)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert time.perf_counter() - start < 10
    return str(info.value)


def deep(levels):
    value = "x"
    for _ in range(levels):
        value = [value]
    return value


def shared(levels):
    value = ["x"]
    for _ in range(levels):
        value = [value, value]
    return value


@pytest.mark.parametrize(
    "change, match",
    [
        ({"layer_structure": [1, 60, 1]}, r"weights do not fit its settings|has shape"),
        ({"layer_structure": [1, 1000, 1]}, r"entries must be above 0 and at most 64"),
        ({"layer_structure": [1, float("inf"), 1]}, r"layer_structure entry is inf, not a finite number"),
        ({"dropout_structure": 5}, r"dropout_structure 5 must have one entry per layer_structure entry"),
        ({"step": 2.5}, r"step is 2.5, not a whole number"),
        ({"step": "abc"}, r"step is 'abc', not a finite number"),
        ({"step": torch.ones(3)}, r"step: holds a tensor where a setting belongs"),
        ({"name": b"bytes"}, r"name: holds a bytes"),
        ({"optional_info": torch.zeros(2)}, r"optional_info: holds a tensor"),
        ({"optional_info": deep(5000)}, r"nested too deeply|nested more than 16 deep"),
        ({"name": shared(60)}, r"too large a structure|nested more than"),
        ({"activation_func": "threshold"}, r"malformed hypernetwork settings|unknown activation"),
        ({"is_layer_norm": "yes"}, r"add_layer_norm is 'yes', not true or false"),
        ({-40: ({}, {})}, r"width -40 is not a whole number from 1 to 16384"),
        ({10**12: ({}, {})}, r"width 1000000000000 is not a whole number"),
    ],
)
def test_malformed_settings_are_one_line(tmp_path, change, match):
    data = base_dict()
    data.update(change)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(50_000)  # to write the 5,000-deep nesting
    try:
        torch.save(data, tmp_path / "bad.pt")
    finally:
        sys.setrecursionlimit(limit)
    refused(tmp_path / "bad.pt", match)


def test_a_small_file_calling_for_huge_layers_costs_nothing(tmp_path):
    tiny = {
        2048: ({"linear.0.weight": torch.zeros(2, 2)}, {"linear.0.weight": torch.zeros(2, 2)}),
        "layer_structure": [1, 60, 1],
    }
    torch.save(tiny, tmp_path / "huge.pt")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    refused(tmp_path / "huge.pt", r"weights do not fit its settings")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024, "not a byte of the layers"


@pytest.mark.parametrize(
    "tensor, match",
    [
        (torch.full((192, 96), float("nan")), r"holds NaN or infinite weights; the file is damaged"),
        (torch.zeros(192, 96, dtype=torch.int8), r"holds int8; weights are float16/32/64 or bfloat16"),
        (torch.zeros(192, 96, dtype=torch.bool), r"holds bool"),
        (torch.zeros(192, 96, dtype=torch.complex64), r"holds complex64"),
        (torch.zeros(192, 96).to_sparse(), r"is a torch.sparse_coo tensor|refused"),
        (torch.zeros(192, 96, device="meta"), r"is a meta tensor|refused|not a readable"),
    ],
)
def test_bad_tensors_are_refused(tmp_path, tensor, match):
    data = base_dict()
    data[96][0]["linear.0.weight"] = tensor
    torch.save(data, tmp_path / "t.pt")
    refused(tmp_path / "t.pt", match)


def test_zip_bombs_and_size_lies(tmp_path):
    torch.save(base_dict(), tmp_path / "good.pt")
    with (
        zipfile.ZipFile(tmp_path / "good.pt") as source,
        zipfile.ZipFile(tmp_path / "bomb.pt", "w", zipfile.ZIP_DEFLATED) as bomb,
    ):
        for info in source.infolist():
            bomb.writestr(info.filename, source.read(info.filename))
        bomb.writestr("archive/data/999", b"\0" * (64 << 20))  # 64 MiB in a few KB
    assert os.path.getsize(tmp_path / "bomb.pt") < 4 << 20, "64 MiB more in a few KB"
    refused(tmp_path / "bomb.pt", r"its zip members claim [\d,]+ bytes in a file of [\d,]+: refused \(a zip bomb")
    raw = bytearray((tmp_path / "good.pt").read_bytes())
    directory = raw.rindex(b"PK\x01\x02")  # the last central directory entry: claim 4 GiB
    raw[directory + 24 : directory + 28] = (0xFFFFFFF0).to_bytes(4, "little")
    (tmp_path / "liar.pt").write_bytes(bytes(raw))
    refused(tmp_path / "liar.pt", r"refused \(a zip bomb|not a readable PyTorch file")


def test_misleading_files_get_messages_that_say_what_they_are(tmp_path):
    (tmp_path / "text.pt").write_bytes(b"hello!\n")
    message = refused(tmp_path / "text.pt", r"text.pt: not a PyTorch file$")
    assert "weights_only" not in message
    hypernet.save(hypernet.load(a1111_file("case1_default_relu")), tmp_path / "st.safetensors")
    shutil.copy(tmp_path / "st.safetensors", tmp_path / "st.pt")
    refused(tmp_path / "st.pt", r"st.pt: a safetensors file: name it .safetensors")
    shutil.copy(tmp_path / "st.safetensors", tmp_path / "UPPER.SAFETENSORS")
    assert hypernet.load(tmp_path / "UPPER.SAFETENSORS").widths == [96, 40, 80, 160]
    shutil.copy(a1111_file("case1_default_relu"), tmp_path / "pt.safetensors")
    refused(tmp_path / "pt.safetensors", r"pt.safetensors: a PyTorch file: name it .pt")
    import tarfile

    with tarfile.open(tmp_path / "old.pt", "w") as tar:
        (tmp_path / "pickle").write_bytes(b"\x80\x02}q\x00.")
        tar.add(tmp_path / "pickle", arcname="pickle")
    message = refused(tmp_path / "old.pt", r"old tar format, which cannot be read safely")
    assert "weights_only=False" not in message
    os.mkfifo(tmp_path / "fifo.pt")
    refused(tmp_path / "fifo.pt", r"fifo.pt: not a regular file")


def test_safetensors_metadata_of_the_wrong_type(tmp_path):
    hypernet.save(hypernet.load(a1111_file("case1_default_relu")), tmp_path / "ok.safetensors")
    tensors = load_file(tmp_path / "ok.safetensors")
    metadata = hypernet.untrusted.read_safetensors_header(tmp_path / "ok.safetensors")["__metadata__"]
    for key, value, match in [
        ("pt_keys", '{"a": 1}', r"pt_keys is not a list of names"),
        ("pt_keys", "[" * 5000 + "]" * 5000, r"pt_keys is not JSON|nested"),
        ("step", '"abc"', r"step is 'abc'"),
        ("layer_structure", "[1, 1e999, 1]", r"not a finite number"),
        ("widths", "[96, -40]", r"width -40 is not a whole number"),
    ]:
        save_file(tensors, tmp_path / "bad.safetensors", metadata=dict(metadata, **{key: value}))
        refused(tmp_path / "bad.safetensors", match)


def test_optimizer_state_is_read_only_when_asked_and_a_bad_one_is_ignored(tmp_path):
    shutil.copy(a1111_file("case8_with_optim"), tmp_path / "c.pt")
    optim = torch.load(a1111_file("case8_with_optim", ".pt.optim"), weights_only=True)
    optim["optimizer_state_dict"]["param_groups"][0]["params"] = [[0, 1], 2]
    torch.save(optim, tmp_path / "c.pt.optim")
    assert hypernet.read(tmp_path / "c.pt").optimizer is None, "generate never reads the .optim"
    with pytest.warns(UserWarning, match=r"ignoring optimizer state: .*params are not lists of parameter numbers"):
        assert hypernet.read(tmp_path / "c.pt", optimizer_state=True).optimizer is None
    optim = torch.load(a1111_file("case8_with_optim", ".pt.optim"), weights_only=True)
    optim["optimizer_state_dict"]["param_groups"][0]["weight_decay"] = float("nan")
    torch.save(optim, tmp_path / "c.pt.optim")
    with pytest.warns(UserWarning, match=r"ignoring optimizer state: .*its weight_decay is nan"):
        hypernet.read(tmp_path / "c.pt", optimizer_state=True)
    optim["optimizer_state_dict"]["param_groups"][0]["weight_decay"] = 0.01
    optim["extra"] = shared(60)
    torch.save(optim, tmp_path / "c.pt.optim")
    with pytest.warns(UserWarning, match=r"ignoring optimizer state: .*too large a structure|nested"):
        hypernet.read(tmp_path / "c.pt", optimizer_state=True)
    os.remove(tmp_path / "c.pt.optim")
    os.mkfifo(tmp_path / "c.pt.optim")
    with pytest.warns(UserWarning, match=r"c.pt.optim: not a regular file"):
        hypernet.read(tmp_path / "c.pt", optimizer_state=True)
    assert run_script("convert.py", "--info", tmp_path / "c.pt") == 0, "--info does not block on a FIFO"


# generate.py --------------------------------------------------------------------------------------------------


@pytest.fixture
def no_pipeline(monkeypatch):
    import diffusers

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the error was reported")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", refuse)


def generate_error(capsys, *argv):
    capsys.readouterr()
    code = run_script("generate.py", *argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("generate.py: error: ") and "\n" not in err, err
    return err


def test_prompt_tags_resolve_only_inside_the_hypernetwork_dir(tiny_model_dir, tmp_path, capsys, no_pipeline):
    hn_dir = tmp_path / "hypernetworks"
    hn_dir.mkdir()
    shutil.copy(a1111_file("case1_default_relu"), hn_dir / "style.pt")
    (tmp_path / "secret").mkdir()
    shutil.copy(a1111_file("case1_default_relu"), tmp_path / "secret" / "private.pt")
    common = [
        "--pretrained_model_name_or_path",
        tiny_model_dir,
        "--hypernetwork_dir",
        hn_dir,
        "--output_dir",
        tmp_path / "out",
    ]
    for tag in ("../secret/private", str(tmp_path / "secret" / "private"), "../../tiny/unet/diffusion_pytorch_model"):
        err = generate_error(capsys, *common, "--prompt", f"<hypernet:{tag}:1> a cat")
        assert f"no hypernetwork {tag!r} in {hn_dir} (it has: style)" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--hypernetwork", "{case1}:nan"], r"the multiplier must be from -100 to 100"),
        (["--hypernetwork", "{case1}:inf"], r"the multiplier must be from -100 to 100"),
        (["--hypernetwork", "{case1}:1e30"], r"the multiplier must be from -100 to 100"),
        (["--prompt", "<hypernet:case1:nan> x"], r"prompt tag <hypernet:case1:nan>: the multiplier must be"),
        (["--guidance_scale", "nan"], r"--guidance_scale nan: must be from 0 to 100"),
        (["--width", "-64"], r"--width -64: must be a multiple of 8 from 8 to 8192 pixels"),
        (["--width", "0"], r"--width 0: must be a multiple of 8 from 8 to 8192 pixels"),
        (["--device", "bogus"], r"--device 'bogus': not a device"),
        (["--device", "cuda:7"], r"--device cuda:7: no such CUDA device here"),
        (["--seed", str(2**70)], r"--seed 1180591620717411303424: must be from 0 to 4294967295"),
        (["--prompts_file", "{latin}"], r"--prompts_file .*latin.txt: not UTF-8 or UTF-16 text"),
        (["--output_dir", "{file}"], r"--output_dir .*a-file: is a file, not a folder"),
    ],
)
def test_generate_flags_are_checked_before_the_model_loads(
    tiny_model_dir, tmp_path, capsys, no_pipeline, flags, message
):
    shutil.copy(a1111_file("case1_default_relu"), tmp_path / "case1.pt")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "a-file").write_text("x")
    values = {"case1": tmp_path / "case1.pt", "latin": tmp_path / "latin.txt", "file": tmp_path / "a-file"}
    argv = [
        "--pretrained_model_name_or_path",
        tiny_model_dir,
        "--hypernetwork_dir",
        tmp_path,
        "--output_dir",
        tmp_path / "out",
        "--prompt",
        "a cat",
    ]
    err = generate_error(capsys, *argv, *[f.format(**values) for f in flags])
    assert __import__("re").search(message, err), err


def test_generate_reads_utf16_prompts_numbers_on_and_takes_a_file_with_a_colon(tiny_model_dir, tmp_path):
    (tmp_path / "prompts.txt").write_bytes("a café\n".encode("utf-16"))
    (tmp_path / "colon:dir").mkdir()
    shutil.copy(a1111_file("case1_default_relu"), tmp_path / "colon:dir" / "a.pt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "00000-0.png").write_bytes(b"an earlier run's image")
    argv = [
        "--pretrained_model_name_or_path",
        tiny_model_dir,
        "--prompts_file",
        tmp_path / "prompts.txt",
        "--hypernetwork",
        tmp_path / "colon:dir" / "a.pt",
        "--num_inference_steps",
        2,
        "--output_dir",
        out,
        "--no_progress",
    ]
    assert run_script("generate.py", *argv) == 0
    assert (out / "00000-0.png").read_bytes() == b"an earlier run's image"
    assert sorted(os.listdir(out)) == ["00000-0.png", "00001-0.png"]


def test_generate_and_convert_refuse_an_unwritable_output_folder(tiny_model_dir, tmp_path, capsys, no_pipeline):
    with read_only_folder(tmp_path / "ro") as ready:
        if not ready:
            pytest.skip("no read-only folder can be made here")
        err = generate_error(
            capsys, "--pretrained_model_name_or_path", tiny_model_dir, "--prompt", "x", "--output_dir", tmp_path / "ro"
        )
        assert "not writable" in err
        assert run_script("convert.py", a1111_file("case1_default_relu"), tmp_path / "ro" / "x.safetensors") == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("convert.py: error: ") and "\n" not in err and "x.safetensors" in err, err


# convert.py ---------------------------------------------------------------------------------------------------


def test_convert_never_deletes_or_overwrites_what_it_was_not_asked_to(tmp_path, capsys):
    shutil.copy(a1111_file("case8_with_optim"), tmp_path / "a.pt")
    shutil.copy(a1111_file("case8_with_optim", ".pt.optim"), tmp_path / "a.pt.optim")
    os.symlink(tmp_path / "a.pt", tmp_path / "link.pt")
    optim = (tmp_path / "a.pt.optim").read_bytes()
    assert run_script("convert.py", tmp_path / "link.pt", tmp_path / "a.pt", "--overwrite") == 2
    assert "the output must be a different file from the input" in capsys.readouterr().err
    assert (tmp_path / "a.pt.optim").read_bytes() == optim

    (tmp_path / "dst.pt.optim").write_bytes(b"someone else's")
    assert run_script("convert.py", a1111_file("case1_default_relu"), tmp_path / "dst.pt") == 2
    assert "dst.pt.optim: exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert (tmp_path / "dst.pt.optim").read_bytes() == b"someone else's" and not (tmp_path / "dst.pt").exists()


def test_a_failed_conversion_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    data = base_dict()
    data[96][0]["linear.0.weight"][0, 0] = 1e5  # finite in fp32, inf in fp16
    torch.save(data, tmp_path / "big.pt")
    assert run_script("convert.py", tmp_path / "big.pt", tmp_path / "half.pt", "--dtype", "fp16") == 2
    assert "a weight of 1e+05 does not fit fp16 (largest 6.55e+04); keep fp32 or bf16" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["big.pt"]

    def damage(hn, path, *args, **kwargs):
        real_save(hn, path, *args, **kwargs)
        with open(path, "r+b") as f:
            f.seek(-200, 2)
            f.write(b"\0" * 50)

    real_save = hypernet.save
    monkeypatch.setattr(hypernet, "save", damage)
    assert run_script("convert.py", a1111_file("case1_default_relu"), tmp_path / "out.safetensors") == 2
    assert "out.safetensors" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["big.pt"], "nothing half-done left behind"
    monkeypatch.setattr(hypernet, "save", real_save)
    assert run_script("convert.py", a1111_file("case1_default_relu"), tmp_path / "out.safetensors") == 0


def test_folder_conversion_converts_every_good_file_and_lists_the_bad(tmp_path, capsys):
    source = tmp_path / "in"
    source.mkdir()
    for case in ("case1_default_relu", "case3_layernorm_swish", "case8_with_optim"):
        shutil.copy(a1111_file(case), source / f"{case}.pt")
    shutil.copy(a1111_file("case8_with_optim", ".pt.optim"), source / "case8_with_optim.pt.optim")
    (source / "b-broken.pt").write_bytes(b"not a model")
    (source / "c-lora.safetensors").write_bytes(b"")
    save_file({"w": torch.zeros(2)}, source / "d-lora.safetensors", metadata={"format": "pt"})
    assert run_script("convert.py", source, tmp_path / "out", "--to", "safetensors", "--optimizer_state") == 2
    out = capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "out")) == [
        "case1_default_relu.safetensors",
        "case3_layernorm_swish.safetensors",
        "case8_with_optim.safetensors",
        "case8_with_optim.safetensors.optim",
    ]
    assert "FAILED: " in out and "b-broken.pt: not a PyTorch file" in out and "skipped: " in out
    assert out.strip().splitlines()[-1] == "converted 3 file(s), skipped 1, 2 failed"


# structured fuzzing ---------------------------------------------------------------------------------------------

MUTATIONS = {
    "wrong type": [b"bytes", torch.ones(2), {"a": 1}, 3.5, -7, None, "text", [1, "x"]],
    "not finite": [float("nan"), float("inf"), -float("inf")],
    "huge": [10**15, 1e300, "x" * 100_000, list(range(20_000))],
    "nested": [deep(40), shared(50)],
}
FIELDS = [
    "step",
    "name",
    "layer_structure",
    "activation_func",
    "is_layer_norm",
    "activate_output",
    "use_dropout",
    "dropout_structure",
    "last_layer_dropout",
    "optional_info",
    "weight_initialization",
    "extra",
]
TENSOR_CHANGES = ["half", "int", "transpose", "extra_dim", "empty", "sparse", "nan", "scalar"]


def mutate_tensor(tensor, how):
    return {
        "half": lambda t: t.half(),
        "int": lambda t: t.int(),
        "transpose": lambda t: t.t().contiguous() if t.dim() == 2 else t.unsqueeze(0),
        "extra_dim": lambda t: t.unsqueeze(0),
        "empty": lambda t: t[:0],
        "sparse": lambda t: t.to_sparse(),
        "nan": lambda t: t * float("nan"),
        "scalar": lambda t: t.sum(),
    }[how](tensor)


def within_bounds(action):
    """Run `action`: only hypernet's own errors may come out, within 10 s and 300 MiB more peak memory."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        action()
    except HypernetError as e:
        assert "\n" not in str(e)
    assert time.perf_counter() - start < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 300 * 1024


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    field=st.sampled_from(FIELDS),
    kind=st.sampled_from(sorted(MUTATIONS)),
    pick=st.integers(0, 100),
    tensor_change=st.one_of(st.none(), st.sampled_from(TENSOR_CHANGES)),
    target=st.sampled_from(["pt", "safetensors", "optim"]),
)
def test_fuzz_structured_mutations_of_real_files(tmp_path_factory, field, kind, pick, tensor_change, target):
    import warnings

    directory = tmp_path_factory.mktemp("mutated")
    value = MUTATIONS[kind][pick % len(MUTATIONS[kind])]
    data = torch.load(a1111_file("case8_with_optim"), weights_only=True)
    if target == "optim":
        shutil.copy(a1111_file("case8_with_optim"), directory / "m.pt")
        optim = torch.load(a1111_file("case8_with_optim", ".pt.optim"), weights_only=True)
        groups = optim["optimizer_state_dict"]["param_groups"]
        if field in ("step", "name"):
            groups[0]["lr" if field == "step" else "params"] = value
        else:
            optim["optimizer_state_dict"]["state"][0][field] = value
        if tensor_change:
            state = optim["optimizer_state_dict"]["state"][1]
            state["exp_avg"] = mutate_tensor(state["exp_avg"], tensor_change)
        torch.save(optim, directory / "m.pt.optim")

        def action():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hypernet.read(directory / "m.pt", optimizer_state=True)

        return within_bounds(action)
    data[field] = value
    if tensor_change:
        data[96][0]["linear.0.weight"] = mutate_tensor(data[96][0]["linear.0.weight"], tensor_change)
    if target == "pt":
        torch.save(data, directory / "m.pt")
        return within_bounds(lambda: hypernet.load(directory / "m.pt"))
    hypernet.save(hypernet.load(a1111_file("case8_with_optim")), directory / "ok.safetensors")
    tensors = load_file(directory / "ok.safetensors")
    metadata = hypernet.untrusted.read_safetensors_header(directory / "ok.safetensors")["__metadata__"]
    key = {"is_layer_norm": "is_layer_norm"}.get(field, field)
    import json

    if kind == "nested":  # as JSON text: serializing the shared structure itself would take 2^50 steps
        metadata[key] = "[" * 40 + "]" * 40 if pick % 2 == 0 else "[" + ",".join(["[1, [2, 3]]"] * 20_000) + "]"
    elif isinstance(value, (torch.Tensor, bytes)):
        metadata[key] = "{not json"
    else:
        metadata[key] = json.dumps(value)
    if tensor_change and tensor_change not in ("sparse", "int"):
        tensors["96.k.linear.0.weight"] = mutate_tensor(tensors["96.k.linear.0.weight"], tensor_change).contiguous()
    save_file(tensors, directory / "m.safetensors", metadata=metadata)
    within_bounds(lambda: hypernet.load(directory / "m.safetensors"))
