import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0
from helpers import CASES, a1111_file

import hypernet
from hypernet.attachment import HypernetworkProjection, fold


def unet_inputs(seed=1, batch=2, side=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, side, side, generator=g, dtype=dtype)
    text = torch.randn(batch, 77, 96, generator=g, dtype=dtype)
    return sample, torch.tensor([10, 500][:batch]), text


def run(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample


@pytest.fixture
def unet64(unet):
    return copy.deepcopy(unet).double()


def linear_hypernetwork(**kwargs):
    return hypernet.Hypernetwork([96, 40, 80, 160], weight_init="XavierNormal", **kwargs).double()


class WebuiAttention:
    """The webui's attention with hypernetworks, from its formula: each hypernetwork in turn maps the context,
    k = to_k(c + mlp_k(c)·m), v = to_v(c + mlp_v(c)·m); in self-attention the context is the hidden states. With an
    IP-Adapter processor's own to_k_ip/to_v_ip, the image tokens (the last `ip.num_tokens`) bypass the hypernetworks."""

    def __init__(self, hypernetworks, ip=None):
        self.hypernetworks, self.ip = hypernetworks, ip

    def attend(self, attn, q, k, v):
        b, h = q.shape[0], attn.heads
        q, k, v = (t.view(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))
        weights = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
        return (weights @ v).transpose(1, 2).reshape(b, -1, h * q.shape[-1])

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if self.ip is not None and encoder_hidden_states is not None:
            context, image = context[:, : -self.ip.num_tokens[0]], context[:, -self.ip.num_tokens[0] :]
        context_k = context_v = context
        for hn in self.hypernetworks:
            pair = hn.pair(context.shape[-1])
            if pair is not None:
                context_k = context_k + pair[0].linear(context_k) * pair[0].multiplier
                context_v = context_v + pair[1].linear(context_v) * pair[1].multiplier
        out = self.attend(attn, attn.to_q(hidden_states), attn.to_k(context_k), attn.to_v(context_v))
        if self.ip is not None and encoder_hidden_states is not None:
            image_k, image_v = self.ip.to_k_ip[0](image), self.ip.to_v_ip[0](image)
            out = out + self.ip.scale[0] * self.attend(attn, attn.to_q(hidden_states), image_k, image_v)
        return attn.to_out[1](attn.to_out[0](out))


def cross_attentions(unet):
    return [m for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention]


def install_ip_adapter(unet):
    """The real IPAdapterAttnProcessor2_0 on every cross-attention layer, with random image projections."""
    torch.manual_seed(11)
    processors = {}
    for name, processor in unet.attn_processors.items():
        if "attn2" in name:
            attn = unet.get_submodule(name[: -len(".processor")])
            ip = IPAdapterAttnProcessor2_0(attn.to_q.out_features, 96, num_tokens=(4,), scale=0.7).double()
            for layer in (*ip.to_k_ip, *ip.to_v_ip):
                torch.nn.init.normal_(layer.weight, std=0.2)
            processors[name] = ip
        else:
            processors[name] = processor
    unet.set_attn_processor(processors)


@pytest.mark.parametrize("processor", ["default", "sliced", "ip_adapter"])
@pytest.mark.parametrize("case", CASES)
def test_unet_outputs_equal_the_webuis_for_every_reference_file(case, processor, unet64):
    hn = hypernet.load(a1111_file(case)).double().set_multiplier(0.8)
    inputs = unet_inputs(side=16, dtype=torch.float64)
    if processor == "sliced":
        unet64.set_attention_slice(1)
    if processor == "ip_adapter":
        install_ip_adapter(unet64)
        image = torch.randn(2, 4, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        inputs = (*inputs[:2], torch.cat([inputs[2], image], dim=1))
    processors = unet64.attn_processors
    kinds = {type(p).__name__ for p in processors.values()}
    assert (
        kinds
        == {
            "default": {"AttnProcessor2_0"},
            "sliced": {"SlicedAttnProcessor"},
            "ip_adapter": {"AttnProcessor2_0", "IPAdapterAttnProcessor2_0"},
        }[processor]
    )
    with hypernet.attach(unet64, [hn]):
        assert unet64.attn_processors == processors, "attach leaves every processor as it is"
        got = run(unet64, inputs)
    reference = {
        name: WebuiAttention([hn], ip=p if isinstance(p, IPAdapterAttnProcessor2_0) else None)
        for name, p in processors.items()
    }
    unet64.set_attn_processor(reference)
    want = run(unet64, inputs)
    unet64.set_attn_processor(dict(processors))  # it empties the dict it is given
    plain = run(unet64, inputs)
    assert (got - want).abs().max() < 1e-10
    assert (want - plain).abs().max() > 1e-3
    if processor == "ip_adapter":
        ip = next(p for p in processors.values() if isinstance(p, IPAdapterAttnProcessor2_0))
        assert all(isinstance(layer, torch.nn.Linear) for layer in (*ip.to_k_ip, *ip.to_v_ip)), "not wrapped"


def test_xformers_processor_where_installed(unet64):
    pytest.importorskip("xformers")
    hn = hypernet.load(a1111_file("case1_default_relu")).double()
    inputs = unet_inputs(dtype=torch.float64)
    with hypernet.attach(unet64, [hn]):
        want = run(unet64, inputs)
    unet64.enable_xformers_memory_efficient_attention()
    with hypernet.attach(unet64, [hn]):
        assert (run(unet64, inputs) - want).abs().max() < 1e-6


def test_attach_wraps_to_k_and_to_v_and_detach_restores_the_same_objects(unet):
    inputs = unet_inputs()
    bare = run(unet, inputs)
    originals = {
        (name, side): getattr(m, side)
        for name, m in unet.named_modules()
        if isinstance(m, Attention)
        for side in ("to_k", "to_v")
    }
    hn = hypernet.load(a1111_file("case1_default_relu"))
    with hypernet.attach(unet, [hn]) as handle:
        for (name, side), original in originals.items():
            wrapper = getattr(unet.get_submodule(name), side)
            assert isinstance(wrapper, HypernetworkProjection) and wrapper.base_layer is original
        assert (run(unet, inputs) - bare).abs().max() > 1e-3
        hn.set_multiplier(0.0)
        assert torch.equal(run(unet, inputs), bare)
        hn.set_multiplier(1.0)
        with pytest.raises(hypernet.HypernetError, match="already has hypernetworks attached; detach"):
            hypernet.attach(unet, [hn])
    for (name, side), original in originals.items():
        assert getattr(unet.get_submodule(name), side) is original
    assert torch.equal(run(unet, inputs), bare)
    handle.detach()  # a second detach is harmless


def test_fused_qkv_projections_are_refused(unet64):
    unet64.fuse_qkv_projections()
    with pytest.raises(hypernet.HypernetError, match=r"fused QKV projections.*unfuse_qkv_projections\(\)"):
        hypernet.attach(unet64, [linear_hypernetwork()])
    unet64.unfuse_qkv_projections()
    hypernet.attach(unet64, [linear_hypernetwork()]).detach()


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


def test_a_hypernetwork_for_another_family_warns_which_of_its_modules_apply(unet):
    sd1 = hypernet.Hypernetwork(hypernet.SD1_WIDTHS, name="for-sd1")
    assert hypernet.attachment.unused_widths(sd1, sorted(hypernet.SD2_WIDTHS)) == (
        "hypernetwork 'for-sd1': its width 768 (the SD 1.x text width) matches no attention layer of this SD 2.x "
        "model (widths [320, 640, 1024, 1280]), so only its modules for 320, 640, 1280 apply; it was made for another "
        "model family"
    )
    assert hypernet.attachment.unused_widths(sd1, sorted(hypernet.SD1_WIDTHS)) is None
    tiny_sd2 = hypernet.Hypernetwork([128, 40, 80, 160], name="tiny-sd2")
    with pytest.warns(UserWarning) as caught:
        hypernet.attach(unet, [tiny_sd2]).detach()
    assert [str(w.message) for w in caught] == [
        "hypernetwork 'tiny-sd2': its width 128 matches no attention layer of this model (widths [40, 80, 96, 160]), "
        "so only its modules for 40, 80, 160 apply; it was made for another model family"
    ]


def count_calls(module):
    calls = []
    return calls, module.register_forward_hook(lambda *a: calls.append(1))


def test_text_context_modules_run_once_per_unet_forward(unet):
    hn = hypernet.load(a1111_file("case1_default_relu"))
    calls, hook = count_calls(hn.pair(96)[0])
    assert len(cross_attentions(unet)) >= 7
    sample, t, text = unet_inputs()
    with hypernet.attach(unet, [hn]) as handle, torch.no_grad():
        for step in range(3):
            unet(sample + step, t, text)
        assert len(calls) == 3, "once per forward, not once per layer"
        handle.text_context_once = False
        unet(sample, t, text)
        assert len(calls) == 3 + len(cross_attentions(unet)), "the webui's way: once per layer"
    hook.remove()


def write_through_data(hn):
    for p in hn.parameters():
        p.data.copy_(p.data * 1.5 + 0.01)


def ema_copy_to(hn):
    from diffusers.training_utils import EMAModel

    ema = EMAModel([p.detach().clone() for p in hn.parameters()])
    for p in ema.shadow_params:
        p.add_(0.05)
    ema.copy_to(hn.parameters())


def fused_adamw_step(hn):
    optimizer = torch.optim.AdamW(hn.parameters(), lr=0.1, fused=True)
    for p in hn.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    hn.zero_grad()


@pytest.mark.parametrize("change", [fused_adamw_step, write_through_data, ema_copy_to])
@pytest.mark.parametrize("activation_func", ["linear", "relu"])
@pytest.mark.parametrize("merge", [False, True])
def test_no_stale_output_after_weights_change(unet, change, activation_func, merge):
    hn = hypernet.Hypernetwork([96, 40, 80, 160], activation_func=activation_func, weight_init="XavierNormal")
    inputs = unet_inputs()
    with hypernet.attach(unet, [hn], merge=merge) as handle:
        before = run(unet, inputs)
        with torch.no_grad():
            change(hn)
        if merge:
            handle.merge()  # merged weights are made by explicit calls only
        after = run(unet, inputs)
        assert (after - before).abs().max() > 1e-4
        handle.unmerge()
    with hypernet.attach(unet, [hn], use_linear_maps=False):
        assert (run(unet, inputs) - after).abs().max() < 1e-4


def test_a_merged_attachment_refuses_changed_hypernetworks_and_training(unet):
    hn = hypernet.Hypernetwork([96, 40, 80, 160], weight_init="XavierNormal", name="a").eval().requires_grad_(False)
    other = hypernet.Hypernetwork([96, 40, 80, 160], weight_init="XavierNormal").eval().requires_grad_(False)
    inputs = unet_inputs()
    with hypernet.attach(unet, [hn], merge=True) as handle:
        merged = run(unet, inputs)

        def refused(pattern):
            with pytest.raises(hypernet.HypernetError, match=pattern):
                run(unet, inputs)
            handle.merge()  # bakes the change: the next forward runs, and computes something else
            assert (run(unet, inputs) - merged).abs().max() > 1e-6

        hn.set_multiplier(0.5)
        refused(r"hypernetwork 'a''s multiplier changed since the attachment was merged: call attachment.merge\(\)")
        optimizer = torch.optim.AdamW(hn.parameters(), lr=0.1, foreach=True)
        for p in hn.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()  # an optimizer step, seen through the weights' version counters
        refused(r"hypernetwork 'a''s weights changed since")
        hn.load_state_dict({key: value * 0.9 for key, value in hn.state_dict().items()})
        refused(r"hypernetwork 'a''s weights changed since")
        handle.hypernetworks.append(other)
        refused(r"the list of hypernetworks changed since")
        hn.train()
        refused(r"hypernetwork 'a' was put in training mode since")
        hn.requires_grad_(True)
        with pytest.raises(hypernet.HypernetError, match=r"merged, so its hypernetworks cannot train: .*unmerge\(\)"):
            unet(*inputs)
        handle.unmerge()
        unet(*inputs).sample.square().mean().backward()  # unmerged, it trains
        assert all(p.grad is not None for p in hn.parameters())


def test_merged_context_manager_unmerges_at_its_end(unet):
    hn = linear_hypernetwork().eval().set_multiplier(0.7)
    inputs = unet_inputs()
    with hypernet.attach(unet, [hn]) as handle:
        unmerged = run(unet, inputs)
        with handle.merged():
            assert handle.is_merged and all(p.merged_weight is not None for _, _, p in handle.projections)
            assert (run(unet, inputs) - unmerged).abs().max() < 1e-5
        assert not handle.is_merged and all(p.merged_weight is None for _, _, p in handle.projections)
        hn.set_multiplier(0.2)  # unmerged, a change needs no call
        assert (run(unet, inputs) - unmerged).abs().max() > 1e-4


def test_import_registers_no_hook_and_builds_no_module():
    """Importing hypernet changes nothing in torch: no optimizer hook, no module built (a subprocess, fresh)."""
    code = (
        "import torch, torch.optim.optimizer as o\n"
        "built = []\n"
        "init = torch.nn.Module.__init__\n"
        "torch.nn.Module.__init__ = lambda self, *a, **k: (built.append(type(self).__name__), init(self, *a, **k))[1]\n"
        "before = dict(o._global_optimizer_post_hooks)\n"
        "import hypernet, hypernet.attachment, hypernet.training\n"
        "assert dict(o._global_optimizer_post_hooks) == before, 'an optimizer hook'\n"
        "assert not built, built\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_merge_bakes_linear_hypernetworks_into_the_projections_at_no_extra_cost(unet64):
    from torch.utils.flop_counter import FlopCounterMode

    stack = [linear_hypernetwork().eval().set_multiplier(0.7), linear_hypernetwork().eval().set_multiplier(-0.4)]
    inputs = unet_inputs(side=16, dtype=torch.float64)
    weights = {name: t.clone() for name, t in unet64.state_dict().items()}

    def flops(fn):
        with FlopCounterMode(display=False) as counter:
            out = fn()
        return out, counter.get_total_flops()

    plain, plain_flops = flops(lambda: run(unet64, inputs))
    with hypernet.attach(unet64, stack, use_linear_maps=False):
        wrapped = run(unet64, inputs)
    with hypernet.attach(unet64, stack, merge=True) as handle:
        first, _ = flops(lambda: run(unet64, inputs))  # merges
        merged, merged_flops = flops(lambda: run(unet64, inputs))
        assert merged_flops == plain_flops, "a merged UNet does the plain UNet's arithmetic"
        stack[1].set_multiplier(0.9)
        handle.merge()
        remerged = run(unet64, inputs)
        handle.unmerge()
        stack[1].set_multiplier(-0.4)
        unmerged = run(unet64, inputs)
    assert torch.equal(first, merged)
    assert (merged - wrapped).abs().max() < 1e-12 and (wrapped - plain).abs().max() > 1e-2
    assert (remerged - merged).abs().max() > 1e-3
    assert (unmerged - wrapped).abs().max() < 1e-12
    assert all(torch.equal(weights[name], t) for name, t in unet64.state_dict().items()), "weights bit for bit"


def test_merge_keeps_non_linear_hypernetworks_wrapped(unet64):
    stack = [linear_hypernetwork().eval(), linear_hypernetwork(activation_func="relu").eval()]
    inputs = unet_inputs(dtype=torch.float64)
    with hypernet.attach(unet64, stack, use_linear_maps=False):
        want = run(unet64, inputs)
    with hypernet.attach(unet64, stack, merge=True) as handle:
        assert (run(unet64, inputs) - want).abs().max() < 1e-12
        assert all(projection.merged_weight is None for _, _, projection in handle.projections)


def test_merged_generation_equals_the_wrapped_one(tiny_pipeline):
    hn = hypernet.Hypernetwork([96, 40, 80, 160], weight_init="XavierNormal").eval().set_multiplier(0.8)
    images = []
    for merge in (False, True):
        with hypernet.attach(tiny_pipeline.unet, [hn], merge=merge):
            images.append(
                tiny_pipeline(
                    "a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np"
                ).images
            )
    assert abs(images[0] - images[1]).max() < 1e-4


def test_gradient_checkpointing_gives_the_same_gradients(unet):
    for activation_func in ("relu", "linear"):
        hn = hypernet.Hypernetwork([96, 40, 80, 160], activation_func=activation_func, weight_init="XavierNormal")
        sample, t, text = unet_inputs(side=16)
        grads = []
        for checkpointing in (False, True):
            unet.enable_gradient_checkpointing() if checkpointing else unet.disable_gradient_checkpointing()
            hn.train().zero_grad()
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


def forward_flops_and_grads(unet, hypernetworks, inputs, use_linear_maps, train):
    from torch.utils.flop_counter import FlopCounterMode

    for hn in hypernetworks:
        hn.train(train).zero_grad()
    with hypernet.attach(unet, hypernetworks, use_linear_maps=use_linear_maps), torch.set_grad_enabled(train):
        with FlopCounterMode(display=False) as counter:
            out = unet(*inputs).sample
        if train:
            out.square().mean().backward()
    grads = [p.grad.clone() for hn in hypernetworks for p in hn.parameters()] if train else []
    return out.detach(), counter.get_total_flops(), grads


def test_linear_maps_give_the_same_images_for_at_most_a_third_of_the_arithmetic(unet64):
    stack = [linear_hypernetwork().set_multiplier(0.7), linear_hypernetwork().set_multiplier(-0.4)]
    inputs = unet_inputs(side=32, dtype=torch.float64)
    plain, plain_flops, _ = forward_flops_and_grads(unet64, [], inputs, True, train=False)
    want, layer_flops, _ = forward_flops_and_grads(unet64, stack, inputs, False, train=False)
    got, flops, _ = forward_flops_and_grads(unet64, stack, inputs, True, train=False)
    assert (got - want).abs().max() < 1e-12 and (want - plain).abs().max() > 1e-2
    # As layers, a [1, 2, 1] module costs 4w² multiply-adds per token; as a linear map w², or nothing per token
    # once folded into to_k/to_v, plus the maps and folds themselves.
    assert plain_flops < flops < plain_flops + (layer_flops - plain_flops) / 3


def test_linear_maps_train_to_the_layers_gradients(unet64):
    hn = linear_hypernetwork()
    inputs = unet_inputs(dtype=torch.float64)
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


def test_with_grad_linear_maps_fold_into_to_k_and_to_v_where_tokens_outnumber_the_width(unet64):
    from torch.utils.flop_counter import FlopCounterMode

    unet64.requires_grad_(False)
    hn = linear_hypernetwork()
    inputs = unet_inputs(side=32, batch=1, dtype=torch.float64)
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
    # Per module and layer, forward and backward each trade n·w² multiply-adds on the tokens for about w³ on the
    # weights: widths 40 (1024 tokens) and 80 (256) fold, and save at least half of that.
    saved = sum(3 * 2 * 2 * 2 * (n * w * w - w**3 - w**2) for w, n in ((40, 1024), (80, 256)))
    assert saved / 2 < unfolded_flops - flops <= saved


def test_projections_with_a_lora_adapter_keep_it(unet64):
    from peft import LoraConfig

    unet64.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_v"]))
    for name, p in unet64.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    hn = linear_hypernetwork().eval()
    inputs = unet_inputs(side=16, dtype=torch.float64)
    processors = {name: WebuiAttention([hn]) for name in unet64.attn_processors}
    originals = unet64.attn_processors
    unet64.set_attn_processor(processors)
    want = run(unet64, inputs)
    unet64.set_attn_processor(originals)
    for merge in (False, True):
        with hypernet.attach(unet64, [hn], merge=merge):
            assert (run(unet64, inputs) - want).abs().max() < 1e-12
    unet64.disable_adapters()
    with hypernet.attach(unet64, [hn]):
        assert (run(unet64, inputs) - want).abs().max() > 1e-2


@pytest.mark.parametrize("side", [4, 8, 16, 32])
def test_with_grad_a_width_gets_linear_maps_only_where_they_pay(unet64, side):
    hn = linear_hypernetwork()
    inputs = unet_inputs(side=side, batch=1, dtype=torch.float64)
    _, layer_flops, _ = forward_flops_and_grads(unet64, [hn], inputs, False, train=True)
    _, flops, _ = forward_flops_and_grads(unet64, [hn], inputs, True, train=True)
    assert flops <= layer_flops
    if side >= 16:
        assert flops < layer_flops


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
    inputs = unet_inputs(side=16, dtype=torch.float64)
    for train in modes:
        torch.manual_seed(5)
        want, want_flops, _ = forward_flops_and_grads(unet64, [hn], inputs, False, train=train)
        torch.manual_seed(5)
        got, flops, _ = forward_flops_and_grads(unet64, [hn], inputs, True, train=train)
        assert torch.equal(got, want) and flops == want_flops


def test_with_grad_the_choice_follows_the_input_size(unet64):
    from torch.utils.flop_counter import FlopCounterMode

    hn = linear_hypernetwork().train()
    big = unet_inputs(side=32, batch=1, dtype=torch.float64)
    _, layer_flops, _ = forward_flops_and_grads(unet64, [hn], big, False, train=True)
    with hypernet.attach(unet64, [hn]):
        unet64(*unet_inputs(side=2, batch=1, dtype=torch.float64)).sample.sum().backward()  # too small to pay
        with FlopCounterMode(display=False) as counter:
            unet64(*big)
    assert counter.get_total_flops() < layer_flops


def test_fold_is_the_projection_of_the_mapped_context():
    torch.manual_seed(0)
    w, b = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    maps = [(torch.randn(4, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)) for _ in range(2)]
    x = torch.randn(3, 4, dtype=torch.float64)
    mapped = x
    for m, c in maps:
        mapped = mapped + F.linear(mapped, m, c)
    weight, bias = fold(w, b, maps)
    assert torch.allclose(F.linear(x, weight, bias), F.linear(mapped, w, b), atol=1e-12)
