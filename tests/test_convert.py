import hashlib
import json
import os
import re
import shutil

import pytest
import torch
from helpers import A1111, CASES, a1111_file, run_script
from test_formats import assert_same_structure

import hypernet
from hypernet.conversion import TOLERANCE, verify
from hypernet.hashing import shorthash


def run(capsys, *argv):
    capsys.readouterr()
    code = run_script("convert.py", *argv)
    return code, capsys.readouterr().out


@pytest.mark.parametrize("case", CASES)
def test_every_a1111_file_round_trips_with_identical_outputs(case, tmp_path, capsys):
    code, out = run(capsys, a1111_file(case), tmp_path / "x.safetensors")
    assert code == 0 and "outputs identical" in out
    code, out = run(capsys, tmp_path / "x.safetensors", tmp_path / "x.pt")
    assert code == 0 and "outputs identical" in out
    assert_same_structure(
        torch.load(a1111_file(case), weights_only=True), torch.load(tmp_path / "x.pt", weights_only=True)
    )


def test_optimizer_state_is_carried_with_a_new_hash(tmp_path, capsys):
    code, out = run(capsys, a1111_file("case8_with_optim"), tmp_path / "plain.safetensors")
    assert "optimizer state left out (a pickle; --optimizer_state writes it beside a .safetensors)" in out
    assert os.listdir(tmp_path) == ["plain.safetensors"]  # no pickle beside a safetensors file unless asked
    code, out = run(capsys, a1111_file("case8_with_optim"), tmp_path / "c.safetensors", "--optimizer_state")
    assert "optimizer state carried to c.safetensors.optim" in out
    optim = torch.load(str(tmp_path / "c.safetensors") + ".optim", weights_only=True)
    assert optim["hash"] == shorthash(tmp_path / "c.safetensors") != shorthash(a1111_file("case8_with_optim"))
    run(capsys, tmp_path / "c.safetensors", tmp_path / "c.pt")
    assert hypernet.read(tmp_path / "c.pt", optimizer_state=True).optimizer is not None

    shutil.copy(a1111_file("case1_default_relu"), tmp_path / "stale.pt")
    shutil.copy(a1111_file("case8_with_optim", ".pt.optim"), tmp_path / "stale.pt.optim")
    code, out = run(capsys, tmp_path / "stale.pt", tmp_path / "stale.safetensors")
    assert "optimizer state NOT carried (ignoring optimizer state:" in out
    assert not os.path.exists(tmp_path / "stale.safetensors.optim")


@pytest.mark.parametrize("dtype, torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_reduced_precision_within_stated_tolerance(dtype, torch_dtype, tmp_path, capsys):
    code, out = run(capsys, a1111_file("case3_layernorm_swish"), tmp_path / "h.pt", "--dtype", dtype)
    assert code == 0 and "outputs within" in out
    data = torch.load(tmp_path / "h.pt", weights_only=True)
    assert data[96][0]["linear.0.weight"].dtype == torch_dtype
    worst = float(out.split("outputs within ")[1].split()[0])
    assert 0 < worst <= TOLERANCE[dtype]
    code, out = run(capsys, tmp_path / "h.pt", tmp_path / "back.safetensors", "--dtype", "fp32")
    assert "outputs identical" in out, "widening is exact"


def test_verification_catches_a_wrong_file(tmp_path):
    original = hypernet.load(a1111_file("case1_default_relu"))
    hypernet.save(hypernet.load(a1111_file("case8_with_optim")), tmp_path / "other.pt")
    with pytest.raises(hypernet.HypernetError, match=r"verification failed: widths \[96, 40\]"):
        verify(original, str(tmp_path / "other.pt"), "fp32")
    tweaked = hypernet.load(a1111_file("case1_default_relu"))
    with torch.no_grad():
        tweaked.pair(40)[1].linear[0].bias.add_(1e-3)
    hypernet.save(tweaked, tmp_path / "tweaked.pt")
    with pytest.raises(hypernet.HypernetError, match=r"verification failed: outputs differ by .* over 0.0"):
        verify(original, str(tmp_path / "tweaked.pt"), "fp32")


def test_folder_conversion_with_summary(tmp_path, capsys):
    code, out = run(capsys, A1111, tmp_path / "st", "--to", "safetensors")
    assert code == 0
    assert sorted(os.listdir(tmp_path / "st")) == sorted(c + ".safetensors" for c in CASES)
    assert "skipped: " in out and "expected.safetensors: not a hypernet safetensors file" in out
    assert out.strip().endswith("converted 4 file(s), skipped 1, 0 failed")
    code, out = run(capsys, tmp_path / "st", tmp_path / "pt")
    assert code == 0 and sorted(f for f in os.listdir(tmp_path / "pt") if f.endswith(".pt")) == [
        c + ".pt" for c in CASES
    ]


def test_refuses_to_overwrite_and_leaves_no_temporary_files(tmp_path, capsys, monkeypatch):
    target = tmp_path / "x.safetensors"
    target.write_bytes(b"keep me")
    assert run_script("convert.py", a1111_file("case1_default_relu"), target) == 2
    assert f"convert.py: error: {target}: exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert target.read_bytes() == b"keep me"
    code, _ = run(capsys, a1111_file("case1_default_relu"), target, "--overwrite")
    assert code == 0 and hypernet.load(target).widths == [96, 40, 80, 160]
    assert os.listdir(tmp_path) == ["x.safetensors"]


def test_info_prints_every_field(tmp_path, capsys):
    shutil.copy(a1111_file("case8_with_optim"), tmp_path / "c.pt")
    shutil.copy(a1111_file("case8_with_optim", ".pt.optim"), tmp_path / "c.pt.optim")
    code, out = run(capsys, "--info", tmp_path / "c.pt", "--json")
    fields = json.loads(out)
    assert fields["name"] == "case8_with_optim" and fields["step"] == 1 and fields["widths"] == [96, 40]
    assert fields["layer_structure"] == [1, 2, 1] and fields["activation_func"] == "relu"
    assert (
        fields["add_layer_norm"] is False
        and fields["use_dropout"] is False
        and fields["dropout_structure"] == [0, 0, 0]
    )
    assert fields["weight_init"] == "Normal" and fields["activate_output"] is False
    assert fields["parameters"] == 2 * (2 * (96 * 192 + 192 + 192 * 96 + 96)) // 2 + 2 * (40 * 80 + 80 + 80 * 40 + 40)
    with open(os.path.join(A1111, "cases.json")) as f:
        case = json.load(f)["case8_with_optim"]
    # The webui's own hashes (written by its modules/hashes.py), and Civitai's AutoV2: sha256's first 10 hex digits.
    assert fields["shorthash"] == case["shorthash"] and fields["sha256"] == case["sha256"]
    assert fields["sha256"] == hashlib.sha256((tmp_path / "c.pt").read_bytes()).hexdigest()
    assert fields["autov2"] == fields["sha256"][:10]
    assert fields["optimizer_state"] == "present, valid (AdamW)"
    assert "sd_checkpoint" in fields and "sd_checkpoint_name" in fields
    code, out = run(capsys, "--info", a1111_file("case3_layernorm_swish"))
    assert (
        "activation_func     swish" in out
        and "add_layer_norm      True" in out
        and "optimizer_state     absent" in out
    )
    with open(tmp_path / "c.pt", "ab") as f:
        f.write(b"\0")
    code, out = run(capsys, "--info", tmp_path / "c.pt")
    assert "optimizer_state     present, INVALID: ignoring optimizer state:" in out

    assert run(capsys, a1111_file("case1_default_relu"), tmp_path / "c.safetensors")[0] == 0
    code, out = run(capsys, "--info", tmp_path / "c.safetensors")
    assert code == 0 and re.search(
        r"\nothers +ComfyUI, Easy Diffusion and ersatzForge list a .safetensors in a hypernetwork folder and "
        r"apply nothing from this layout; give them the .pt",
        out,
    )
    assert re.search(r"\nmetadata.widths +\[96, 40, 80, 160\]\n", out)


UNREADABLE = "/proc/self/mem"  # a regular file whose read fails with EIO


@pytest.mark.skipif(not os.path.exists(UNREADABLE), reason="needs Linux's /proc")
def test_files_whose_read_fails_are_named_in_one_line(tmp_path, capsys):
    from helpers import ROOT

    for name in ("mem.pt", "mem.safetensors"):
        os.symlink(UNREADABLE, tmp_path / name)
    for path in (UNREADABLE, tmp_path / "mem.pt", tmp_path / "mem.safetensors"):
        assert run_script("convert.py", "--info", path) == 2
        assert capsys.readouterr().err.strip() == f"convert.py: error: {path}: cannot be read (Input/output error)"
        code = run_script(
            "generate.py",
            "--pretrained_model_name_or_path",
            os.path.join(ROOT, "examples", "demo-sd"),
            "--hypernetwork",
            path,
            "--prompt",
            "x",
            "--output_dir",
            tmp_path / "out",
        )
        assert code == 2
        assert capsys.readouterr().err.strip() == f"generate.py: error: {path}: cannot be read (Input/output error)"

    code = run_script(
        "generate.py",
        "--pretrained_model_name_or_path",
        os.path.join(ROOT, "examples", "demo-sd"),
        "--prompts_file",
        UNREADABLE,
        "--output_dir",
        tmp_path / "out",
    )
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"generate.py: error: --prompts_file {UNREADABLE}: cannot be read (Input/output error)"
    )

    shutil.copy(a1111_file("case1_default_relu"), tmp_path / "c.pt")
    os.symlink(UNREADABLE, tmp_path / "c.pt.optim")
    code, out = run(capsys, "--info", tmp_path / "c.pt")
    reason = f"ignoring optimizer state: {tmp_path / 'c.pt.optim'}: cannot be read (Input/output error)"
    assert code == 0 and f"optimizer_state     present, INVALID: {reason}; training restarts the optimizer" in out
