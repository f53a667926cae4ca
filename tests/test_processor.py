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
