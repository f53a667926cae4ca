import pytest
import torch

import hypernet
from hypernet.errors import ArgumentError
from hypernet.module import ACTIVATIONS, HypernetworkModule, default_dropout_structure


def test_key_indices_follow_a1111_order_with_prelu_layernorm_dropout():
    module = HypernetworkModule(
        8, [1, 2, 2, 1], "prelu", add_layer_norm=True, activate_output=True, dropout_structure=[0, 0.3, 0.3, 0]
    )
    kinds = [type(layer).__name__ for layer in module.linear]
    assert kinds == [
        "Linear",
        "PReLU",
        "LayerNorm",
        "Dropout",
        "Linear",
        "PReLU",
        "LayerNorm",
        "Dropout",
        "Linear",
        "PReLU",
        "LayerNorm",
    ]
    assert list(module.state_dict()) == [
        "linear.0.weight",
        "linear.0.bias",
        "linear.1.weight",
        "linear.2.weight",
        "linear.2.bias",
        "linear.4.weight",
        "linear.4.bias",
        "linear.5.weight",
        "linear.6.weight",
        "linear.6.bias",
        "linear.8.weight",
        "linear.8.bias",
        "linear.9.weight",
        "linear.10.weight",
        "linear.10.bias",
    ]


def test_no_activation_after_last_layer_unless_activate_output():
    assert [type(x).__name__ for x in HypernetworkModule(4, [1, 2, 1], "relu").linear] == ["Linear", "ReLU", "Linear"]
    kinds = [type(x).__name__ for x in HypernetworkModule(4, [1, 2, 1], "linear", activate_output=True).linear]
    assert kinds == ["Linear", "Linear"]
    assert type(HypernetworkModule(4, [1, 2, 1], "swish").linear[1]) is torch.nn.Hardswish


def test_fractional_layer_structure_uses_int_of_dim_times_factor():
    module = HypernetworkModule(40, [1, 1.5, 0.25, 1])
    assert [layer.out_features for layer in module.linear] == [60, 10, 40]


def test_every_torch_activation_by_lower_case_name():
    for name in ("gelu", "silu", "mish", "softplus", "prelu", "leakyrelu", "elu", "tanh", "sigmoid"):
        assert name in ACTIVATIONS
        HypernetworkModule(4, [1, 2, 1], name)


def test_forward_is_residual_and_multiplier_only_in_eval():
    module = HypernetworkModule(6, [1, 2, 1], "relu", weight_init="XavierNormal")
    x = torch.randn(2, 3, 6)
    module.multiplier = 0.25
    module.eval()
    assert torch.allclose(module(x), x + module.linear(x) * 0.25)
    module.train()
    assert torch.allclose(module(x), x + module.linear(x))


@pytest.mark.parametrize("init", ["Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal"])
def test_weight_init(init):
    module = HypernetworkModule(256, [1, 2, 1], "leakyrelu", weight_init=init, add_layer_norm=True)
    linear, norm = module.linear[0], module.linear[2]
    assert torch.count_nonzero(linear.bias) == 0
    assert abs(norm.weight.std().item() - 0.01) < 0.003, "LayerNorm always gets Normal(0, 0.01)"
    std = linear.weight.std().item()
    fan_in, fan_out = 256, 512
    want = {
        "Normal": 0.01,
        "XavierUniform": (2 / (fan_in + fan_out)) ** 0.5,
        "XavierNormal": (2 / (fan_in + fan_out)) ** 0.5,
        "KaimingUniform": (2 / (1 + 0.01**2) / fan_in) ** 0.5,
        "KaimingNormal": (2 / (1 + 0.01**2) / fan_in) ** 0.5,
    }[init]
    assert abs(std - want) / want < 0.05


def test_dropout_structure_derived_like_a1111():
    assert default_dropout_structure([1, 2, 1], False, False) == [0, 0, 0]
    assert default_dropout_structure([1, 2, 1], True, False) == [0, 0, 0]
    assert default_dropout_structure([1, 2, 2, 1], True, False) == [0, 0.3, 0, 0]
    assert default_dropout_structure([1, 2, 2, 1], True, True) == [0, 0.3, 0.3, 0]
    hn = hypernet.Hypernetwork([8], layer_structure=[1, 2, 1], dropout_structure=[0, 0.1, 0])
    assert hn.config.use_dropout is True and hn.config.last_layer_dropout is True


def test_bad_settings_are_clear_errors():
    with pytest.raises(ArgumentError, match=r"^layer_structure \[2, 2, 1\] must start and end with 1") as raised:
        hypernet.Hypernetwork([8], layer_structure=[2, 2, 1])
    assert raised.value.argument == "layer_structure"
    with pytest.raises(ArgumentError, match="^activation_func 'wobbly': unknown activation; use one of"):
        hypernet.Hypernetwork([8], activation_func="wobbly")
    with pytest.raises(ArgumentError, match="^weight_init 'Zeros': unknown; use one of"):
        hypernet.Hypernetwork([8], weight_init="Zeros")
    with pytest.raises(ArgumentError, match="^dropout_structure .* one entry per layer_structure"):
        hypernet.Hypernetwork([8], dropout_structure=[0, 0])


def test_hypernetwork_pairs_and_multiplier():
    hn = hypernet.Hypernetwork(hypernet.SD1_WIDTHS, name="x")
    assert hn.widths == [768, 320, 640, 1280]
    assert hn.pair(1024) is None
    k, v = hn.pair(768)
    assert k is not v and k.linear[0].in_features == 768
    hn.set_multiplier(0.3)
    assert k.multiplier == v.multiplier == hn.multiplier == 0.3
