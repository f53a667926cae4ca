"""The library called from someone's own code: a wrong type, a non-finite or out-of-range number, an empty list, a
string where a list is meant, each an ArgumentError naming the argument, never a deep error; save refuses what
load would refuse."""

import math

import pytest
import torch

import hypernet
from hypernet.errors import ArgumentError
from hypernet.prompts import PromptEncoder


@pytest.mark.parametrize(
    "settings, argument",
    [
        ({"layer_structure": [True, 2, True]}, "layer_structure"),
        ({"layer_structure": [1, math.nan, 1]}, "layer_structure"),
        ({"layer_structure": [1, math.inf, 1]}, "layer_structure"),
        ({"layer_structure": "1,2,1"}, "layer_structure"),
        ({"activation_func": "multiheadattention"}, "activation_func"),
        ({"activation_func": 3}, "activation_func"),
    ],
)
def test_settings_no_hypernetwork_can_have_are_refused_by_name(settings, argument):
    with pytest.raises(ArgumentError) as raised:
        hypernet.Hypernetwork([8, 16], **settings)
    assert raised.value.argument == argument and "\n" not in str(raised.value)


@pytest.mark.parametrize("widths", [[-96], [0], [True], [8.5], "768", None])
def test_widths_must_be_positive_whole_numbers(widths):
    with pytest.raises(ArgumentError, match=r"^widths "):
        hypernet.Hypernetwork(widths)


def test_the_activations_offered_are_elementwise():
    with pytest.raises(ArgumentError) as raised:
        hypernet.Hypernetwork([8], activation_func="multiheadattention")
    offered = str(raised.value).split("use one of: ")[1].split(", ")
    assert "relu" in offered and "multiheadattention" not in offered and "softmax" not in offered


@pytest.mark.parametrize("multiplier", [math.nan, math.inf, -1e9, "0.8", None, True])
def test_a_multiplier_no_one_means_is_refused(multiplier):
    hn = hypernet.Hypernetwork([8])
    with pytest.raises(ArgumentError, match=r"^multiplier "):
        hn.set_multiplier(multiplier)
    assert hn.multiplier == 1.0, "nothing was set"


def test_save_refuses_what_load_would_refuse(tmp_path):
    hn = hypernet.Hypernetwork([8])
    for dtype in (torch.int8, torch.float64, "fp16"):
        with pytest.raises(ArgumentError, match=r"^dtype "):
            hypernet.save(hn, tmp_path / "x.pt", dtype=dtype)
    with pytest.raises(ArgumentError, match=r"^hn a OrderedDict, not a Hypernetwork"):
        hypernet.save(hn.state_dict(), tmp_path / "x.pt")
    assert not list(tmp_path.iterdir()), "nothing written"
    hypernet.save(hn, tmp_path / "x.pt", dtype=torch.float16)
    assert hypernet.load(tmp_path / "x.pt").widths == [8]


@pytest.mark.parametrize("path", [b"\x80PK...", 42, None])
def test_load_takes_a_path(path):
    with pytest.raises(ArgumentError, match=r"^path a (bytes|int|NoneType): give the file's path"):
        hypernet.load(path)


def test_attach_takes_hypernetworks_not_their_names(unet):
    for value, message in [
        (["base.pt"], r"'base.pt' is a str, not a Hypernetwork: load it first, hypernet.load\(path\)"),
        (None, r"None is a NoneType, not a Hypernetwork"),
    ]:
        with pytest.raises(ArgumentError, match=rf"^hypernetworks {message}"):
            hypernet.attach(unet, value)
    assert all(type(m).__name__ == "Linear" for n, m in unet.named_modules() if n.endswith(("to_k", "to_v")))


def test_apply_hypernetworks_takes_a_floating_point_context():
    hn = hypernet.Hypernetwork([8])
    with pytest.raises(ArgumentError, match=r"^context a torch.int64 tensor: give a floating-point tensor"):
        hypernet.apply_hypernetworks([hn], torch.zeros(1, 4, 8, dtype=torch.int64))
    k, v = hypernet.apply_hypernetworks([hn], torch.zeros(1, 4, 8))
    assert k.shape == v.shape == (1, 4, 8)


def test_encode_prompts_takes_a_list_of_prompts(tiny_pipeline):
    encoder = PromptEncoder([tiny_pipeline.tokenizer], [tiny_pipeline.text_encoder])
    for prompts, message in [
        ("a red circle", r"^prompts str: give a list of prompts, e.g. \['a red circle'\]"),
        ([], r"^prompts \[\]: give at least one prompt"),
        (["a", 3], r"^prompts \['str', 'int'\]: every prompt must be a str"),
    ]:
        with pytest.raises(ArgumentError, match=message):
            encoder(prompts)
        with pytest.raises(ArgumentError, match=message):
            encoder.each(prompts)
    assert encoder(["a red circle"])[0].shape[0] == 1


def test_the_offered_activations_do_not_depend_on_the_device_they_are_first_asked_on():
    from hypernet.module import trainable_activations

    trainable_activations.cache_clear()
    with torch.device("meta"):  # as a file's settings are checked, before anything is allocated
        offered = trainable_activations()
    assert "relu" in offered and "linear" in offered and "softmax" not in offered
