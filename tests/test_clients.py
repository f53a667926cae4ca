"""Every file the project writes passes the webui's checks and loads in ComfyUI, and convert.py --info says which
client computes what. The rules tested here are the clients' own (modules/safe.py and
modules/hypernetworks/hypernetwork.py of the webui, comfy_extras/nodes_hypernetwork.py of ComfyUI)."""

import collections
import hashlib
import io
import json
import os
import pickle
import re
import zipfile

import pytest
import torch
from helpers import a1111_file, run_script, train

import hypernet
from hypernet.clients import comfyui_verdict, webui_verdict

WEBUI_V1_9 = re.compile(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$")
WEBUI_V1_10 = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$")
# modules/safe.py RestrictedUnpickler.find_class: the only globals a webui pickle may name.
WEBUI_STORAGES = ("Float", "Half", "Int", "Long", "Double", "Byte", "BFloat16")
WEBUI_ALLOWED = (
    {("collections", "OrderedDict"), ("torch", "float32"), ("numpy", "dtype"), ("numpy", "ndarray")}
    | {("torch._utils", n) for n in ("_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_device_tensor_from_numpy")}
    | {("torch", f"{kind}Storage") for kind in WEBUI_STORAGES}
)


class WebuiUnpickler(pickle.Unpickler):
    """Unpickles data.pkl as the webui's checker does: a global outside its list is an error, storages are empty."""

    def find_class(self, module, name):
        if (module, name) not in WEBUI_ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}/{name}' is forbidden")
        return collections.OrderedDict if name == "OrderedDict" else (lambda *args, **kwargs: None)

    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"


def assert_webui_accepts(path):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        root = os.path.splitext(os.path.basename(path))[0]
        assert {name.split("/")[0] for name in names} == {root}, names[:3]
        assert [n for n in names if not WEBUI_V1_9.match(n)] == [], "a member every webui 1.x refuses"
        assert all(WEBUI_V1_10.match(n) for n in names)
        assert {n.split("/", 1)[1] for n in names} - {"data.pkl", "version"} == {
            f"data/{i}" for i in range(len(names) - 2)
        }
        WebuiUnpickler(io.BytesIO(archive.read(f"{root}/data.pkl"))).load()
    mode = os.stat(path).st_mode & 0o777
    assert mode == 0o666 & ~UMASK, f"{path}: mode {oct(mode)}"
    torch.load(path, weights_only=True)
    torch.load(path, weights_only=True, mmap=True)  # storages aligned as torch.save aligns them


def assert_optim_accepted(pt_path):
    """The webui keeps the optimizer state when optim['hash'] is the first 10 hex digits of the .pt's sha256."""
    assert_webui_accepts(pt_path + ".optim")
    saved = torch.load(pt_path + ".optim", weights_only=True)
    with open(pt_path, "rb") as f:
        assert saved["hash"] == hashlib.sha256(f.read()).hexdigest()[:10]
    assert hypernet.read(pt_path, optimizer_state=True).optimizer is not None


UMASK = 0o027


@pytest.fixture
def umask():
    previous = os.umask(UMASK)
    yield
    os.umask(previous)


def test_api_save_and_conversions_pass_the_webui_checks(tmp_path, umask):
    hn = hypernet.Hypernetwork([96, 40], name="api")
    optimizer = torch.optim.AdamW(hn.parameters(), fused=True)
    for p in hn.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    hypernet.save(hn, tmp_path / "api.pt", hypernet.OptimizerState("AdamW", optimizer.state_dict()))
    assert_webui_accepts(str(tmp_path / "api.pt"))
    assert_optim_accepted(str(tmp_path / "api.pt"))

    assert (
        run_script("convert.py", a1111_file("case8_with_optim"), tmp_path / "c.safetensors", "--optimizer_state") == 0
    )
    assert run_script("convert.py", tmp_path / "c.safetensors", tmp_path / "from-safetensors.pt") == 0
    assert run_script("convert.py", a1111_file("case3_layernorm_swish"), tmp_path / "half.pt", "--dtype", "fp16") == 0
    assert run_script("convert.py", a1111_file("case7_old_format"), tmp_path / "legacy.pt", "--dtype", "bf16") == 0
    for name in ("from-safetensors.pt", "half.pt", "legacy.pt"):
        assert_webui_accepts(str(tmp_path / name))
    assert_optim_accepted(str(tmp_path / "from-safetensors.pt"))


@pytest.mark.parametrize("optimizer", ["AdamW", "AdamW8bit"])
def test_training_files_pass_the_webui_checks(optimizer, tiny_model_dir, small_dataset, tmp_path, umask):
    flags = ["--use_8bit_adam"] if optimizer == "AdamW8bit" else []
    out = tmp_path / "run"
    assert (
        train(tiny_model_dir, small_dataset, out, "--hypernetwork_name", "style", "--save_every", 2, *flags, steps=2)
        == 0
    )
    for path in (out / "style.pt", out / "hypernetworks" / "style-2.pt"):
        assert_webui_accepts(str(path))
        assert_optim_accepted(str(path))
    assert torch.load(out / "style.pt.optim", weights_only=True)["optimizer_name"] == optimizer
    assert os.stat(out / "loss.png").st_mode & 0o777 == 0o640


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_every_file_a_run_writes_gets_the_umasks_mode(tiny_model_dir, small_dataset, tmp_path, mask):
    out = tmp_path / "run"
    previous = os.umask(mask)
    try:
        assert (
            train(
                tiny_model_dir,
                small_dataset,
                out,
                "--hypernetwork_name",
                "style",
                "--save_every",
                2,
                "--save_safetensors",
                "--checkpointing_steps",
                2,
                "--preview_every",
                2,
                steps=2,
            )
            == 0
        )
        assert run_script("convert.py", out / "style.pt", tmp_path / "converted.safetensors") == 0
    finally:
        os.umask(previous)
    files = [
        p
        for p in [*out.rglob("*"), tmp_path / "converted.safetensors", tmp_path / "converted.safetensors.optim"]
        if p.is_file()
    ]
    kinds = {p.suffix for p in files}
    assert {".pt", ".optim", ".safetensors", ".png", ".csv", ".json"} <= kinds, kinds
    assert any("checkpoint-2" in p.parts for p in files)
    wrong = {
        str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777)
        for p in files
        if p.stat().st_mode & 0o777 != 0o666 & ~mask
    }
    assert not wrong, f"expected {oct(0o666 & ~mask)}: {wrong}"


def test_new_hypernetworks_store_linear_and_none_round_trips(tmp_path):
    hypernet.save(hypernet.Hypernetwork([40]), tmp_path / "new.pt")
    data = torch.load(tmp_path / "new.pt", weights_only=True)
    assert data["activation_func"] == "linear"

    torch.save(dict(data, activation_func=None), tmp_path / "none.pt")
    hn = hypernet.load(tmp_path / "none.pt")
    assert hn.config.activation_func is None
    hypernet.save(hn, tmp_path / "none.safetensors")
    hypernet.save(hypernet.load(tmp_path / "none.safetensors"), tmp_path / "back.pt")
    assert torch.load(tmp_path / "back.pt", weights_only=True)["activation_func"] is None


def test_legacy_layout_keeps_its_ordered_dicts(tmp_path):
    read = hypernet.read(a1111_file("case7_old_format"))
    hypernet.save(read.hypernetwork, tmp_path / "old.pt", layout=read.layout)
    data = torch.load(tmp_path / "old.pt", weights_only=True)
    assert list(data) == [96, 40, 160]
    assert all(type(data[w]) is list and [type(sd) for sd in data[w]] == [collections.OrderedDict] * 2 for w in data)
    assert list(data[96][0]) == ["linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"]


# ComfyUI ------------------------------------------------------------------------------------------------------

COMFYUI_ACTIVATIONS = {
    "linear": torch.nn.Identity,
    "relu": torch.nn.ReLU,
    "leakyrelu": torch.nn.LeakyReLU,
    "elu": torch.nn.ELU,
    "swish": torch.nn.Hardswish,
    "tanh": torch.nn.Tanh,
    "sigmoid": torch.nn.Sigmoid,
    "softsign": torch.nn.Softsign,
    "mish": torch.nn.Mish,
}


def comfyui_modules(path):
    """ComfyUI's load_hypernetwork_patch as its source states it: {width: (K, V) Sequential}, or None if refused.
    Modules stay in training mode, as ComfyUI leaves them."""
    data = torch.load(path, weights_only=True)
    activation = data.get("activation_func", "linear")
    if activation not in COMFYUI_ACTIVATIONS:
        return None
    norm, dropout = data.get("is_layer_norm", False), data.get("use_dropout", False)
    activate_output, last_layer_dropout = data.get("activate_output", False), data.get("last_layer_dropout", False)
    result = {}
    for width in (w for w in data if isinstance(w, int)):
        pair = []
        for state in data[width]:
            names = [k[: -len(".weight")] for k in state if k.endswith(".weight")]
            layers, i = [], 0
            while i < len(names):
                last, penultimate = i == len(names) - 1, i == len(names) - 2
                weight = state[f"{names[i]}.weight"]
                linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
                linear.load_state_dict({"weight": weight, "bias": state[f"{names[i]}.bias"]})
                layers.append(linear)
                if activation != "linear" and (not last or activate_output):
                    layers.append(COMFYUI_ACTIVATIONS[activation]())
                if norm:
                    i += 1
                    ln = torch.nn.LayerNorm(state[f"{names[i]}.weight"].shape[0])
                    ln.load_state_dict({"weight": state[f"{names[i]}.weight"], "bias": state[f"{names[i]}.bias"]})
                    layers.append(ln)
                if dropout and not last and (not penultimate or last_layer_dropout):
                    layers.append(torch.nn.Dropout(p=0.3))
                i += 1
            pair.append(torch.nn.Sequential(*layers))
        result[width] = pair
    return result


CONFIGURATIONS = {
    "linear": dict(activation_func="linear"),
    "relu": dict(activation_func="relu"),
    "mish-deep": dict(activation_func="mish", layer_structure=[1, 2, 2, 1]),
    "relu-activate-output": dict(activation_func="relu", activate_output=True),
    "norm-linear": dict(activation_func="linear", add_layer_norm=True),
    "norm-swish": dict(activation_func="swish", add_layer_norm=True),
    "norm-swish-activate-output": dict(activation_func="swish", add_layer_norm=True, activate_output=True),
    "dropout": dict(activation_func="relu", use_dropout=True, layer_structure=[1, 2, 2, 1]),
    "dropout-121": dict(activation_func="relu", dropout_structure=[0, 0.1, 0]),
    "gelu": dict(activation_func="gelu"),
}


@pytest.mark.parametrize("name", CONFIGURATIONS)
def test_comfyui_verdict_matches_what_its_loader_computes(name, tmp_path):
    hn = hypernet.Hypernetwork([40], weight_init="XavierNormal", **CONFIGURATIONS[name]).eval().set_multiplier(0.7)
    path = str(tmp_path / f"{name}.pt")
    hypernet.save(hn, path)
    verdict = comfyui_verdict(hypernet.read(path), path)
    theirs = comfyui_modules(path)
    if theirs is None:
        assert verdict.startswith("refuses it: activation_func 'gelu'")
        return
    x = torch.randn(2, 9, 40)
    torch.manual_seed(0)
    with torch.no_grad():
        same = all(torch.equal(x + seq(x) * 0.7, ours(x)) for seq, ours in zip(theirs[40], hn.pair(40)))
    assert verdict.startswith("loads and computes the same" if same else "loads but computes differently"), verdict


def test_comfyui_verdict_for_the_reference_files_and_missing_keys(tmp_path):
    for case in ("case1_default_relu", "case7_old_format", "case8_with_optim"):
        assert comfyui_verdict(hypernet.read(a1111_file(case)), a1111_file(case)) == "loads and computes the same"
    verdict = comfyui_verdict(hypernet.read(a1111_file("case3_layernorm_swish")), a1111_file("case3_layernorm_swish"))
    assert verdict == (
        "loads but computes differently: with layer norm it applies the activation after the last layer too "
        "(activate_output is False)"
    )
    data = torch.load(a1111_file("case1_default_relu"), weights_only=True)
    del data["activate_output"]  # an older file: the webui reads True, ComfyUI False
    torch.save(data, tmp_path / "no-key.pt")
    path = str(tmp_path / "no-key.pt")
    assert comfyui_verdict(hypernet.read(path), path).endswith("the webui reads True, ComfyUI False")
    assert comfyui_modules(path)[96][0][-1].__class__ is torch.nn.Linear
    hypernet.save(hypernet.Hypernetwork([96]), tmp_path / "linear.pt")
    torch.save(dict(torch.load(tmp_path / "linear.pt"), activation_func=None), tmp_path / "none.pt")
    path = str(tmp_path / "none.pt")
    assert comfyui_modules(path) is None
    assert comfyui_verdict(hypernet.read(path), path).endswith("; the webui reads None as linear")


def info_of(capsys, path):
    capsys.readouterr()
    assert run_script("convert.py", "--info", path, "--json") == 0
    return json.loads(capsys.readouterr().out)


def test_info_has_a_line_per_client(tmp_path, capsys):
    hypernet.save(
        hypernet.load(a1111_file("case8_with_optim")),
        tmp_path / "ours.pt",
        hypernet.OptimizerState("AdamW", {"state": {}, "param_groups": []}),
    )
    hypernet.save(hypernet.load(a1111_file("case8_with_optim")), tmp_path / "ours.safetensors")
    torch.save(torch.load(a1111_file("case8_with_optim"), weights_only=True), tmp_path / "plain.pt")
    info = {name: info_of(capsys, tmp_path / name) for name in ("ours.pt", "ours.safetensors", "plain.pt")}
    assert info["ours.pt"]["webui"] == "loads (every webui 1.x)"
    assert info["ours.pt"]["comfyui"] == "loads and computes the same"
    assert info["ours.safetensors"]["webui"].startswith("not listed: the webui reads only .pt files")
    assert info["ours.safetensors"]["comfyui"].startswith("lists it but applies nothing")
    assert info["plain.pt"]["webui"] == (
        "refuses it: zip member plain/.format_version is not one it admits; re-save it with convert.py"
    )
    case1 = webui_verdict(a1111_file("case1_default_relu"))
    assert case1.startswith("v1.0 to v1.9.4: refuses it, zip member case1_default_relu/byteorder")
    assert "v1.10 and later: loads" in case1

    torch.save({"optimizer_name": "AdamW", "hash": "x", "optimizer_state_dict": {}}, tmp_path / "ours.pt.optim")
    assert webui_verdict(str(tmp_path / "ours.pt")).startswith(
        "refuses it: its ours.pt.optim is refused (zip member ours.pt/.format_version"
    )
    assert run_script("convert.py", "--info", tmp_path / "ours.pt") == 0
    assert "comfyui" in capsys.readouterr().out
