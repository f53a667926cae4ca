import pytest
import torch
from conftest import a1111_file
from diffusers.models.attention_processor import Attention

import hypernet


def unet_inputs(seed=1, batch=2):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 8, 8, generator=g)
    text = torch.randn(batch, 77, 96, generator=g)
    return sample, torch.tensor([10, 500][:batch]), text


def run(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample


def test_attach_changes_output_and_detach_restores(unet):
    inputs = unet_inputs()
    bare = run(unet, inputs)
    hn = hypernet.load(a1111_file("case1_default_relu"))
    originals = unet.attn_processors
    with hypernet.attach(unet, [hn]) as handle:
        assert isinstance(next(iter(unet.attn_processors.values())), hypernet.HypernetworkAttnProcessor)
        assert (run(unet, inputs) - bare).abs().max() > 1e-3
        hn.set_multiplier(0.0)
        assert torch.equal(run(unet, inputs), bare)
        hn.set_multiplier(1.0)
    assert unet.attn_processors == originals
    assert torch.equal(run(unet, inputs), bare)
    handle.detach()  # a second detach is harmless


def test_matches_a1111_rule_computed_by_hand_on_one_layer(unet):
    hn = hypernet.load(a1111_file("case3_layernorm_swish")).set_multiplier(0.7)
    attn = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2
    x = torch.randn(2, 16, 80)
    text = torch.randn(2, 77, 96)
    k_module, v_module = hn.pair(96)
    with torch.no_grad():
        ck = text + k_module.linear(text) * 0.7
        cv = text + v_module.linear(text) * 0.7
        h = attn.heads
        q = attn.to_q(x).view(2, -1, h, 80 // h).transpose(1, 2)
        k = attn.to_k(ck).view(2, -1, h, 80 // h).transpose(1, 2)
        v = attn.to_v(cv).view(2, -1, h, 80 // h).transpose(1, 2)
        weights = (q @ k.transpose(-1, -2) * (80 // h) ** -0.5).softmax(-1)
        want = attn.to_out[0]((weights @ v).transpose(1, 2).reshape(2, -1, 80))
        with hypernet.attach(unet, [hn]):
            got = attn(x, encoder_hidden_states=text)
            self_attn = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
            got_self = self_attn(x)
        sk, sv = hn.pair(80)
        xk, xv = x + sk.linear(x) * 0.7, x + sv.linear(x) * 0.7
        q = self_attn.to_q(x).view(2, -1, h, 80 // h).transpose(1, 2)
        k = self_attn.to_k(xk).view(2, -1, h, 80 // h).transpose(1, 2)
        v = self_attn.to_v(xv).view(2, -1, h, 80 // h).transpose(1, 2)
        weights = (q @ k.transpose(-1, -2) * (80 // h) ** -0.5).softmax(-1)
        want_self = self_attn.to_out[0]((weights @ v).transpose(1, 2).reshape(2, -1, 80))
    assert (got - want).abs().max() < 1e-5
    assert (got_self - want_self).abs().max() < 1e-5


def test_gradients_reach_only_the_hypernetwork(unet):
    hn = hypernet.Hypernetwork([96, 40, 80, 160], activation_func="relu", weight_init="XavierNormal").train()
    unet.requires_grad_(False)
    with hypernet.attach(unet, [hn]):
        sample, t, text = unet_inputs()
        unet(sample, t, text).sample.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in hn.parameters())
    assert all(p.grad is None for p in unet.parameters())


def test_stacking_applies_in_order_and_widths_it_lacks_pass_through():
    a = hypernet.load(a1111_file("case1_default_relu")).set_multiplier(0.5)
    b = hypernet.load(a1111_file("case8_with_optim")).set_multiplier(1.5)
    x = torch.randn(1, 5, 96)
    k, v = hypernet.apply_hypernetworks([a, b], x)
    (ak, av), (bk, bv) = a.pair(96), b.pair(96)
    assert torch.allclose(k, bk(ak(x))) and torch.allclose(v, bv(av(x)))
    y = torch.randn(1, 5, 80)
    k, v = hypernet.apply_hypernetworks([b], y)
    assert k is y and v is y


def test_width_mismatch_names_both_sides(unet):
    sd1 = hypernet.Hypernetwork(hypernet.SD1_WIDTHS, name="for-sd1")
    with pytest.raises(
        hypernet.WidthMismatchError, match=r"'for-sd1' has widths \[768, 320, 640, 1280\] .* use \[40, 80, 96, 160\]"
    ):
        hypernet.attach(unet, [sd1])


def test_text_context_mlp_runs_once_per_context_and_never_stale(unet):
    hn = hypernet.load(a1111_file("case1_default_relu"))
    k_text, _ = hn.pair(96)
    calls = []
    hook = k_text.register_forward_hook(lambda *a: calls.append(1))
    cross_layers = sum(1 for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention)
    assert cross_layers >= 7
    sample, t, text = unet_inputs()
    with hypernet.attach(unet, [hn]) as handle, torch.no_grad():
        first = unet(sample, t, text).sample
        for step in range(3):  # denoising steps with the same prompt embeddings
            unet(sample + step, t, text)
        assert len(calls) == 1
        hn.set_multiplier(0.5)
        assert not torch.equal(unet(sample, t, text).sample, first)
        assert len(calls) == 2
        hn.set_multiplier(1.0)
        with torch.no_grad():
            k_text.linear[0].weight.mul_(1.5)
        changed = unet(sample, t, text).sample
        assert len(calls) == 3
        text.add_(0.0)  # an in-place edit of the context itself
        unet(sample, t, text)
        assert len(calls) == 4
        unet(sample, t, text.clone())
        assert len(calls) == 5 and handle.cache.misses == 5
    hook.remove()
    handle_free = hypernet.attach(unet, [hn])
    with torch.no_grad():
        assert torch.equal(unet(sample, t, text).sample, changed)
    handle_free.detach()


def test_training_forward_shares_text_mlp_across_layers_and_steps_recompute(unet):
    hn = hypernet.Hypernetwork([96, 40, 80, 160], activation_func="relu", weight_init="XavierNormal").train()
    calls = []
    hook = hn.pair(96)[0].register_forward_hook(lambda *a: calls.append(1))
    optimizer = torch.optim.SGD(hn.parameters(), lr=0.1)
    sample, t, text = unet_inputs()
    with hypernet.attach(unet, [hn]):
        for _ in range(2):
            unet(sample, t, text).sample.square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        # same tensor, same weights, a second backward: the cached graph must not be reused
        for _ in range(2):
            unet(sample, t, text).sample.square().mean().backward()
    assert len(calls) == 4
    hook.remove()


def test_gradient_checkpointing_gives_the_same_gradients(unet):
    hn = hypernet.Hypernetwork([96, 40, 80, 160], activation_func="relu", weight_init="XavierNormal").train()
    sample, t, text = unet_inputs()
    grads = []
    for checkpointing in (False, True):
        unet.enable_gradient_checkpointing() if checkpointing else unet.disable_gradient_checkpointing()
        hn.zero_grad()
        with hypernet.attach(unet, [hn]):
            unet(sample, t, text).sample.square().mean().backward()
        grads.append([p.grad.clone() for p in hn.parameters()])
    unet.disable_gradient_checkpointing()
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_works_under_torch_compile(unet):
    hn = hypernet.load(a1111_file("case1_default_relu")).set_multiplier(0.8)
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    x, text = torch.randn(1, 64, 40), torch.randn(1, 77, 96)
    with hypernet.attach(unet, [hn]), torch.no_grad():
        eager = attn(x, encoder_hidden_states=text)
        compiled = torch.compile(attn, backend="aot_eager", fullgraph=True)
        assert torch.allclose(compiled(x, encoder_hidden_states=text), eager, atol=1e-5)


def linear_hypernetwork(**kwargs):
    return hypernet.Hypernetwork([96, 40, 80, 160], weight_init="XavierNormal", **kwargs).double()


def forward_flops_and_grads(unet, hypernetworks, inputs, multiply_out_linear, train):
    from torch.utils.flop_counter import FlopCounterMode

    for hn in hypernetworks:
        hn.train(train).zero_grad()
    with hypernet.attach(unet, hypernetworks, multiply_out_linear), torch.set_grad_enabled(train):
        with FlopCounterMode(display=False) as counter:
            out = unet(*inputs).sample
        if train:
            out.square().mean().backward()
    grads = [p.grad.clone() for hn in hypernetworks for p in hn.parameters()] if train else []
    return out.detach(), counter.get_total_flops(), grads


@pytest.fixture
def unet64(unet):
    import copy

    return copy.deepcopy(unet).double()


def double_inputs(side=8, batch=2):
    g = torch.Generator().manual_seed(3)
    sample = torch.randn(batch, 4, side, side, generator=g, dtype=torch.float64)
    return sample, torch.tensor([10, 500][:batch]), torch.randn(batch, 77, 96, generator=g, dtype=torch.float64)


def test_linear_hypernetworks_multiplied_out_give_the_same_images_for_a_quarter_of_the_arithmetic(unet64):
    stack = [linear_hypernetwork().set_multiplier(0.7), linear_hypernetwork().set_multiplier(-0.4)]
    inputs = double_inputs(side=16)
    plain = unet64(*inputs).sample
    want, module_flops, _ = forward_flops_and_grads(unet64, stack, inputs, False, train=False)
    got, flops, _ = forward_flops_and_grads(unet64, stack, inputs, True, train=False)
    assert (got - want).abs().max() < 1e-12 and (want - plain).abs().max() > 1e-2
    # Self-attention at width w over n tokens: per hypernetwork the two modules cost 2 x 8w²n multiply-add FLOPs as
    # layers, after a one-off (2w x w)(w x 2w) product per module (plus its bias). Multiplied out they cost 4w²n,
    # or, folded into to_k and to_v where n > w, 2 x (2w³ + 2w²) for W @ m and W @ c.
    levels = {40: (3, 0), 80: (3, 1), 160: (4, 2)}
    saved = 0
    for w, (layers, level) in levels.items():
        n = 2 * (16 >> level) ** 2
        applied = 4 * w**3 + 4 * w**2 if n > w else 4 * w * w * n
        saved += layers * (16 * w * w * n - applied) - 2 * (4 * w**3 + 4 * w**2)
    assert module_flops - flops == len(stack) * saved


def test_multiplied_out_training_matches_the_layers_gradient_for_gradient(unet64):
    hn = linear_hypernetwork()
    inputs = double_inputs()
    for checkpointing in (False, True):
        unet64.enable_gradient_checkpointing() if checkpointing else unet64.disable_gradient_checkpointing()
        want, _, want_grads = forward_flops_and_grads(unet64, [hn], inputs, False, train=True)
        got, _, grads = forward_flops_and_grads(unet64, [hn], inputs, True, train=True)
        assert (got - want).abs().max() < 1e-12
        scale = max(g.abs().max() for g in want_grads)
        assert max((a - b).abs().max() for a, b in zip(grads, want_grads)) < 1e-10 * scale


class Projection(torch.nn.Linear):
    """A Linear that is not exactly torch.nn.Linear, as a LoRA or quantized layer is not: never folded into."""


def with_unfoldable_projections(unet):
    import copy

    unet = copy.deepcopy(unet)
    for module in unet.modules():
        if isinstance(module, Attention) and not module.is_cross_attention:
            for name in ("to_k", "to_v"):
                linear = getattr(module, name)
                projection = Projection(linear.in_features, linear.out_features, bias=linear.bias is not None)
                projection.load_state_dict(linear.state_dict())
                projection.requires_grad_(linear.weight.requires_grad)
                setattr(module, name, projection.to(linear.weight.dtype))
    return unet


def test_with_grad_the_multiplied_out_modules_fold_into_to_k_and_to_v_where_tokens_outnumber_the_width(unet64):
    from torch.utils.flop_counter import FlopCounterMode

    unet64.requires_grad_(False)
    hn = linear_hypernetwork()
    inputs = double_inputs(side=32, batch=1)
    results = []
    for unet in (unet64, with_unfoldable_projections(unet64)):
        hn.zero_grad()
        with hypernet.attach(unet, [hn]), FlopCounterMode(display=False) as counter:
            out = unet(*inputs).sample
            out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in hn.parameters()], counter.get_total_flops()))
    (out, grads, flops), (want, want_grads, unfolded_flops) = results
    assert (out - want).abs().max() < 1e-12
    assert max((a - b).abs().max() for a, b in zip(grads, want_grads)) < 1e-10 * max(g.abs().max() for g in grads)
    # Per module and layer, forward and backward each trade n·w² multiply-adds on the tokens for w³ + w² on the
    # weights. Widths 40 (1024 tokens) and 80 (256) fold; 160 (64 tokens per layer) does not.
    saved = sum(3 * 2 * 2 * 2 * (n * w * w - w**3 - w**2) for w, n in ((40, 1024), (80, 256)))
    assert unfolded_flops - flops == saved


def test_projections_with_a_lora_adapter_keep_it_under_multiplied_out_hypernetworks(unet64):
    from peft import LoraConfig

    unet64.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_v"]))
    for name, p in unet64.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    hn = linear_hypernetwork().eval()
    inputs = double_inputs(side=16)
    with torch.no_grad():
        with hypernet.attach(unet64, [hn], multiply_out_linear=False):
            want = unet64(*inputs).sample
        with hypernet.attach(unet64, [hn]):
            got = unet64(*inputs).sample
        unet64.disable_adapters()
        with hypernet.attach(unet64, [hn]):
            without_lora = unet64(*inputs).sample
    assert (got - want).abs().max() < 1e-12 and (got - without_lora).abs().max() > 1e-2


@pytest.mark.parametrize("side", [4, 8, 16, 32])
def test_with_grad_a_width_is_multiplied_out_only_where_it_pays_for_itself(unet64, side):
    hn = linear_hypernetwork()
    inputs = double_inputs(side=side, batch=1)
    _, module_flops, _ = forward_flops_and_grads(unet64, [hn], inputs, False, train=True)
    _, flops, _ = forward_flops_and_grads(unet64, [hn], inputs, True, train=True)
    assert flops <= module_flops
    if side >= 16:
        assert flops < module_flops


@pytest.mark.parametrize(
    "settings, modes",
    [
        (dict(activation_func="relu"), (False, True)),
        (dict(add_layer_norm=True), (False, True)),
        (dict(use_dropout=True, layer_structure=[1, 2, 2, 1]), (True,)),  # in eval mode dropout is the identity
    ],
)
def test_hypernetworks_that_are_not_linear_run_their_layers_exactly(unet64, settings, modes):
    hn = linear_hypernetwork(**settings)
    inputs = double_inputs(side=16)
    for train in modes:
        torch.manual_seed(5)
        want, want_flops, _ = forward_flops_and_grads(unet64, [hn], inputs, False, train=train)
        torch.manual_seed(5)
        got, flops, _ = forward_flops_and_grads(unet64, [hn], inputs, True, train=train)
        assert torch.equal(got, want) and flops == want_flops


def test_multiplied_out_modules_follow_weight_and_multiplier_changes(unet64):
    import copy

    hn = linear_hypernetwork().eval()
    inputs = double_inputs()
    reference_unet = copy.deepcopy(unet64)
    with hypernet.attach(unet64, [hn]), hypernet.attach(reference_unet, [hn], multiply_out_linear=False):

        def check():
            with torch.no_grad():
                got, want = unet64(*inputs).sample, reference_unet(*inputs).sample
            assert (got - want).abs().max() < 1e-12
            return got

        first = check()
        hn.set_multiplier(0.3)
        assert not torch.allclose(check(), first)
        with torch.no_grad():  # as an optimizer step changes the weights
            for p in hn.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        check()
        hn.train()
        check()


def test_with_grad_the_choice_follows_the_input_size(unet64):
    from torch.utils.flop_counter import FlopCounterMode

    hn = linear_hypernetwork().train()
    _, module_flops, _ = forward_flops_and_grads(unet64, [hn], double_inputs(side=32, batch=1), False, train=True)
    with hypernet.attach(unet64, [hn]):
        unet64(*double_inputs(side=2, batch=1)).sample.sum().backward()  # too small to multiply out anything
        with FlopCounterMode(display=False) as counter:
            unet64(*double_inputs(side=32, batch=1))
    assert counter.get_total_flops() < module_flops
