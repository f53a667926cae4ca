import json
import os
import pickle
import re
import shutil
import warnings

import pytest
import torch
from helpers import A1111, CASES, a1111_file
from safetensors.torch import load_file

import hypernet
from hypernet.hashing import shorthash


@pytest.fixture(scope="module")
def expected():
    return load_file(os.path.join(A1111, "expected.safetensors"))


@pytest.fixture(scope="module")
def cases():
    with open(os.path.join(A1111, "cases.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("case", CASES)
def test_reproduces_a1111_outputs(case, expected):
    hn = hypernet.load(a1111_file(case))
    contexts = [key for key in expected if key.startswith(case + "/") and key.endswith("/ctx")]
    assert len(contexts) == len(hn.widths)
    for key in contexts:
        width = key.split("/")[1]
        for multiplier in (1.0, 0.5):
            hn.set_multiplier(multiplier)
            k, v = hypernet.apply_hypernetworks([hn], expected[key])
            assert (k - expected[f"{case}/{width}/k@{multiplier}"]).abs().max() < 1e-5
            assert (v - expected[f"{case}/{width}/v@{multiplier}"]).abs().max() < 1e-5


@pytest.mark.parametrize("case", CASES)
def test_reads_what_a1111_reads(case, cases):
    want = cases[case]
    hn_file = hypernet.read(a1111_file(case), optimizer_state=True)
    hn = hn_file.hypernetwork
    assert sorted(hn.widths) == sorted(want["dims"])
    assert hn.config.layer_structure == want["layer_structure"]
    assert hn.config.activation_func == want["activation_func"]
    assert hn.config.add_layer_norm == want["add_layer_norm"]
    assert hn.config.activate_output == want["activate_output"]
    assert hn.config.dropout_structure == want["dropout_structure"]
    assert (hn_file.optimizer is not None) == want["optimizer_state_loaded"]
    assert shorthash(a1111_file(case)) == want["shorthash"]
    k, _ = hn.pair(hn.widths[0])
    assert sorted(k.state_dict()) == want["state_dict_keys"]


def assert_same_structure(a, b, where="file"):
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for key in a:
            assert_same_structure(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_structure(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("case", CASES)
def test_pt_safetensors_pt_round_trip_is_key_for_key_identical(case, tmp_path):
    original = a1111_file(case)
    for source, target in ((original, tmp_path / "x.safetensors"), (tmp_path / "x.safetensors", tmp_path / "x.pt")):
        read = hypernet.read(source)
        hypernet.save(read.hypernetwork, target, layout=read.layout)  # as convert.py writes a file back
    assert_same_structure(torch.load(original, weights_only=True), torch.load(tmp_path / "x.pt", weights_only=True))


def test_safetensors_header_carries_every_a1111_key(tmp_path):
    hypernet.save(hypernet.load(a1111_file("case3_layernorm_swish")), tmp_path / "x.safetensors")
    meta = hypernet.untrusted.read_safetensors_header(tmp_path / "x.safetensors")["__metadata__"]
    assert json.loads(meta["activation_func"]) == "swish"
    assert json.loads(meta["is_layer_norm"]) is True
    optional_info = torch.load(a1111_file("case3_layernorm_swish"), weights_only=True)["optional_info"]
    assert optional_info and json.loads(meta["optional_info"]) == optional_info
    assert json.loads(meta["widths"]) == [96, 40, 80, 160]
    tensors = load_file(tmp_path / "x.safetensors")
    assert tensors["96.k.linear.3.weight"].shape == (96, 192)


def test_new_hypernetwork_saves_a1111_dict(tmp_path):
    hn = hypernet.Hypernetwork([96, 40], name="fresh", activation_func="relu", step=7)
    hypernet.save(hn, tmp_path / "fresh.pt")
    data = torch.load(tmp_path / "fresh.pt", weights_only=True)
    reference = torch.load(a1111_file("case8_with_optim"), weights_only=True)
    assert list(data) == [96, 40] + [key for key in reference if not isinstance(key, int)]
    assert {key: type(value) for key, value in data.items()} == {
        key: type(value) for key, value in reference.items() if key not in ("sd_checkpoint", "sd_checkpoint_name")
    } | {"sd_checkpoint": type(None), "sd_checkpoint_name": type(None)}
    assert data["step"] == 7 and data["name"] == "fresh" and data["activate_output"] is False


def test_optimizer_state_accepted_when_hash_matches(tmp_path):
    hn_file = hypernet.read(a1111_file("case8_with_optim"), optimizer_state=True)
    hn = hn_file.hypernetwork
    assert hn_file.optimizer.name == "AdamW"
    assert set(hn_file.optimizer.state_dict) == {"state", "param_groups"}
    optimizer = torch.optim.AdamW(hn.parameters())
    optimizer.load_state_dict(hn_file.optimizer.state_dict)
    assert int(optimizer.state_dict()["state"][0]["step"]) == 1


def test_optimizer_state_refused_when_pt_altered(tmp_path):
    shutil.copy(a1111_file("case8_with_optim"), tmp_path / "c.pt")
    shutil.copy(a1111_file("case8_with_optim", ".pt.optim"), tmp_path / "c.pt.optim")
    with open(tmp_path / "c.pt", "ab") as f:
        f.write(b"\0")
    with pytest.warns(UserWarning, match="saved for another file"):
        hn_file = hypernet.read(tmp_path / "c.pt", optimizer_state=True)
    assert hn_file.optimizer is None


def test_optimizer_state_with_wrong_shapes_ignored(tmp_path):
    hn_file = hypernet.read(a1111_file("case8_with_optim"), optimizer_state=True)
    hn = hn_file.hypernetwork
    state = hn_file.optimizer.state_dict
    state["state"][0]["exp_avg"] = torch.zeros(3, 3)
    hypernet.save(hn, tmp_path / "w.pt", hypernet.OptimizerState("AdamW", state))
    with pytest.warns(UserWarning, match=r"exp_avg of parameter 0 has shape \(3, 3\)"):
        assert hypernet.read(tmp_path / "w.pt", optimizer_state=True).optimizer is None


def _sgd_state(state):
    for values in state["state"].values():
        moment = values["exp_avg"]
        values.clear()
        values["momentum_buffer"] = torch.zeros_like(moment)


def _amsgrad_without_its_moment(state):
    state["param_groups"][0]["amsgrad"] = True


def _missing_second_moment(state):
    del state["state"][3]["exp_avg_sq"]


def _two_groups(state):
    params = state["param_groups"][0]["params"]
    state["param_groups"] = [
        dict(state["param_groups"][0], params=params[:4]),
        dict(state["param_groups"][0], params=params[4:]),
    ]


def _nan_step(state):
    state["state"][0]["step"] = torch.tensor(float("nan"))


def _integer_moments(state):
    state["state"][2]["exp_avg"] = state["state"][2]["exp_avg"].to(torch.int64)


def _permuted(state):
    params = state["param_groups"][0]["params"]
    params[0], params[4] = params[4], params[0]  # the K and V modules' first weights: the same shape


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_sgd_state, r"the state of parameter 0 holds momentum_buffer; AdamW keeps exp_avg, exp_avg_sq, step"),
        (
            _amsgrad_without_its_moment,
            r"the state of parameter 0 holds exp_avg, exp_avg_sq, step; AdamW keeps exp_avg, "
            r"exp_avg_sq, max_exp_avg_sq, step",
        ),
        (
            _missing_second_moment,
            r"the state of parameter 3 holds exp_avg, step; AdamW keeps exp_avg, exp_avg_sq, step",
        ),
        (_two_groups, r"it has 2 parameter groups, this AdamW has 1"),
        (_nan_step, r"step of parameter 0 holds NaN or infinite values"),
        (
            _integer_moments,
            r"exp_avg of parameter 2 is a int64 tensor of shape \(96, 192\); AdamW keeps a float32 tensor "
            r"of shape \(96, 192\)",
        ),
        (_permuted, r"its parameters are not in the hypernetwork's order"),
    ],
)
def test_optimizer_state_that_does_not_fit_its_optimizer_is_ignored_with_one_warning(tmp_path, damage, reason):
    hn_file = hypernet.read(a1111_file("case8_with_optim"), optimizer_state=True)
    hn = hn_file.hypernetwork
    state = hn_file.optimizer.state_dict
    damage(state)
    hypernet.save(hn, tmp_path / "d.pt", hypernet.OptimizerState("AdamW", state))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded_file = hypernet.read(tmp_path / "d.pt", optimizer_state=True)
    assert loaded_file.optimizer is None
    (warning,) = [str(w.message) for w in caught]
    assert "\n" not in warning
    assert re.fullmatch(
        rf"ignoring optimizer state: {re.escape(str(tmp_path / 'd.pt.optim'))}: {reason}; "
        "training restarts the optimizer",
        warning,
    ), warning


def test_an_amsgrad_state_with_its_moment_fits_an_amsgrad_adamw(tmp_path):
    hn = hypernet.Hypernetwork([40], name="a")
    optimizer = torch.optim.AdamW(hn.parameters(), amsgrad=True)
    for p in hn.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    hypernet.save(hn, tmp_path / "a.pt", hypernet.OptimizerState("AdamW", optimizer.state_dict()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded_file = hypernet.read(tmp_path / "a.pt", optimizer_state=True)
    assert loaded_file.optimizer.state_dict["param_groups"][0]["amsgrad"] is True


def test_save_writes_optim_companion_with_file_hash(tmp_path):
    hn = hypernet.Hypernetwork([40], name="o")
    optimizer = torch.optim.AdamW(hn.parameters())
    for path in (tmp_path / "o.pt", tmp_path / "o.safetensors"):
        hypernet.save(hn, path, hypernet.OptimizerState("AdamW", optimizer.state_dict()))
        optim = torch.load(str(path) + ".optim", weights_only=True)
        assert optim["hash"] == shorthash(path) and optim["optimizer_name"] == "AdamW"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert hypernet.read(path, optimizer_state=True).optimizer is not None


class Payload:
    def __reduce__(self):
        return (open, ("PWNED_MARKER", "w"))


def test_malicious_pickle_refused_and_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("evil.pt", "wb") as f:
        pickle.dump({768: Payload()}, f)
    torch.save({768: Payload(), "step": 1}, "evil2.pt")
    for name in ("evil.pt", "evil2.pt"):
        with pytest.raises(hypernet.FormatError, match=f"{name}: refused, the file needs arbitrary code"):
            hypernet.load(name)
    assert not os.path.exists("PWNED_MARKER")


def test_truncated_file_names_the_file(tmp_path):
    data = open(a1111_file("case1_default_relu"), "rb").read()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(hypernet.FormatError, match=r"cut\.pt: not a readable PyTorch file.*truncated or corrupted"):
        hypernet.load(tmp_path / "cut.pt")


def test_wrong_layer_structure_and_activation_name_the_file(tmp_path):
    data = torch.load(a1111_file("case1_default_relu"), weights_only=True)
    torch.save(dict(data, layer_structure=[2, 1]), tmp_path / "ls.pt")
    with pytest.raises(hypernet.FormatError, match=r"ls\.pt: layer_structure \[2, 1\] must start and end with 1"):
        hypernet.load(tmp_path / "ls.pt")
    torch.save(dict(data, layer_structure=[1, 3, 1]), tmp_path / "shape.pt")
    with pytest.raises(hypernet.FormatError, match=r"shape\.pt: layers\.96\.0\.linear\.0\.weight has shape"):
        hypernet.load(tmp_path / "shape.pt")
    torch.save(dict(data, activation_func="wobbly"), tmp_path / "act.pt")
    with pytest.raises(hypernet.FormatError, match=r"act\.pt: activation_func 'wobbly': unknown; use one of"):
        hypernet.load(tmp_path / "act.pt")


def test_not_a_hypernetwork(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(hypernet.FormatError, match=r"ckpt\.pt: not a hypernetwork \(no integer width keys"):
        hypernet.load(tmp_path / "ckpt.pt")
    with pytest.raises(hypernet.FormatError, match=r"missing\.pt: no such file"):
        hypernet.load(tmp_path / "missing.pt")
