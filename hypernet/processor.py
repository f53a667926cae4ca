"""Applying hypernetworks inside a diffusers UNet: the attention processor, attach()/detach(), the context cache."""

import weakref

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from .errors import WidthMismatchError


def apply_hypernetworks(hypernetworks, context, linear_maps=None):
    """A1111's apply_hypernetworks: each hypernetwork in turn maps the running K and V contexts.

    A hypernetwork without a module for context's width leaves both unchanged. `linear_maps`, where given, holds
    for each hypernetwork its K and V modules multiplied out (see multiply_out), or None to run the modules.
    """
    context_k = context_v = context
    # Under autocast the matmuls already run in the autocast dtype; casting the context to the weights' dtype and
    # back would only add copies. Without it, compute in the weights' dtype, as A1111 computes in float32.
    autocast = torch.is_autocast_enabled(context.device.type)
    for i, hypernetwork in enumerate(hypernetworks):
        pair = hypernetwork.pair(context.shape[-1])
        if pair is None:
            continue
        module_k, module_v = pair
        dtype = context.dtype if autocast else module_k.linear[0].weight.dtype
        multiplied_out = linear_maps[i] if linear_maps is not None else None
        if multiplied_out is not None:
            context_k, context_v = _apply_multiplied_out(*multiplied_out, context_k, context_v, dtype)
        else:
            context_k = module_k(context_k.to(dtype)).to(context.dtype)
            context_v = module_v(context_v.to(dtype)).to(context.dtype)
    return context_k, context_v


def _apply_multiplied_out(weight, bias, context_k, context_v, dtype):
    """K and V modules as one matrix product when they share their input (2w outputs), else one each."""
    width, out_dtype = context_k.shape[-1], context_k.dtype
    if context_k is context_v:
        x = context_k.to(dtype)
        both = F.linear(x, weight, bias)
        return (x + both[..., :width]).to(out_dtype), (x + both[..., width:]).to(out_dtype)
    k, v = context_k.to(dtype), context_v.to(dtype)
    k = k + F.linear(k, weight[:width], bias[:width])
    v = v + F.linear(v, weight[width:], bias[width:])
    return k.to(out_dtype), v.to(out_dtype)


def multiply_out(module_k, module_v, tokens=None):
    """The K and V modules' Linear layers multiplied out into one (2w, w) weight and (2w,) bias, or None where
    either is not linear, or where `tokens` (the self-attention tokens of one forward at this width) are too few
    for the one-off product to cost less than the multiply-adds it saves."""
    if not (module_k.is_linear and module_v.is_linear):
        return None
    if tokens is not None:
        weights = [layer.weight for layer in module_k.linears]
        width, per_token = weights[0].shape[1], sum(w.numel() for w in weights)
        if tokens * (per_token - width * width) <= (per_token - weights[0].numel()) * width:
            return None
    weight_k, bias_k = module_k.multiplied_out()
    weight_v, bias_v = module_v.multiplied_out()
    return torch.cat([weight_k, weight_v]), torch.cat([bias_k, bias_v])


def fold_into_projections(attn, hypernetworks, linear_maps, hidden_states):
    """[(weight, bias) of K, of V]: to_k and to_v with the multiplied-out modules folded in, or None where a module
    applying at this width is not multiplied out, a projection is not a plain Linear (a LoRA layer, say), or the
    layer's tokens are too few for folding to pay.

    to_k(x + F.linear(x, m, c)) == F.linear(x, W + W @ m, W @ c + b): the map costs one (out, w) @ (w, w) product per
    layer instead of a (tokens, w) @ (w, w) one, and with grad the input's gradient takes one product, as it would
    without the hypernetwork.
    """
    if linear_maps is None or not all(type(linear) is torch.nn.Linear for linear in (attn.to_k, attn.to_v)):
        return None
    width = hidden_states.shape[-1]
    maps = [m for hypernetwork, m in zip(hypernetworks, linear_maps) if hypernetwork.pair(width) is not None]
    if not maps or any(m is None for m in maps):
        return None
    tokens, out = hidden_states.shape[:-1].numel(), max(attn.to_k.out_features, attn.to_v.out_features)
    if torch.is_grad_enabled() and any(weight.requires_grad for weight, _ in maps):
        # Multiply-adds per module besides the projection: applied to the tokens, 3 tokens·w² (forward, the map's
        # gradient, the input's); folded, 2 out·w² (W @ m and its gradient) + tokens·out·w (the folded W's gradient).
        pays = tokens * width * (3 * width - out) > 2 * out * width * width
    else:
        pays = tokens > out
    if not pays:
        return None
    autocast = torch.is_autocast_enabled(hidden_states.device.type)
    dtype = hidden_states.dtype if autocast else maps[0][0].dtype
    folded = []
    for half, linear in enumerate((attn.to_k, attn.to_v)):
        part = slice(half * width, (half + 1) * width)
        weight, bias = linear.weight.to(dtype), None if linear.bias is None else linear.bias.to(dtype)
        for map_weight, map_bias in reversed(maps):  # the last hypernetwork applied is the first folded in
            bias = F.linear(map_bias[part].to(dtype), weight, bias)
            weight = weight + weight @ map_weight[part].to(dtype)
        folded.append((weight.to(hidden_states.dtype), None if bias is None else bias.to(hidden_states.dtype)))
    return folded


def _state_signature(hypernetworks, width):
    """Everything the MLP output for this width depends on besides the input: weights, multiplier, mode."""
    signature = []
    for hypernetwork in hypernetworks:
        pair = hypernetwork.pair(width)
        if pair is None:
            continue
        for module in pair:
            versions = tuple((p.data_ptr(), p._version) for p in module.parameters())
            signature.append((id(module), module.training, module.multiplier, versions))
    return tuple(signature)


class ContextCache:
    """What the processor keeps between calls: the K and V contexts of the last text context, and the
    self-attention modules multiplied out, each reused while nothing it depends on changed.

    Cross-attention layers all receive the same text-embedding tensor, in every layer of a forward and at every
    denoising step of a generation, so the text-width MLPs need to run once per prompt, not once per layer and
    step. That entry is keyed by the tensor's identity and version (it is held weakly), grad mode, autocast, and
    the hypernetworks' weight versions, multipliers and train/eval mode, so a change to any of those recomputes it.

    In self-attention the context is new in every layer, but a linear hypernetwork (A1111's default activation)
    is one matrix: x + x @ (m W2 W1).T + m (W2 b1 + b2). Multiplied out once per width, K and V take one
    w-by-2w product per layer instead of four 2w²-sized ones. Those entries are keyed like the text context's,
    minus the tensor, plus the token count that decided whether multiplying out pays (with grad; see Attachment).

    Entries that carry an autograd graph live for one UNet forward only (new_forward() drops them), since the
    graph is freed by the backward pass.
    """

    def __init__(self):
        self._context = None
        self._key = None
        self._value = None
        self._linear_maps = {}
        self.misses = 0

    def contexts(self, hypernetworks, context):
        if torch.compiler.is_compiling():
            return apply_hypernetworks(hypernetworks, context)
        key = (
            context._version,
            context.shape,
            context.dtype,
            context.device,
            *_mode_key(context.device.type),
            _state_signature(hypernetworks, context.shape[-1]),
        )
        if self._context is not None and self._context() is context and self._key == key:
            return self._value
        self.misses += 1
        self._value = apply_hypernetworks(hypernetworks, context)
        self._context = weakref.ref(context)
        self._key = key
        return self._value

    def linear_maps(self, hypernetworks, width, device_type):
        """The multiplied-out modules stored for this width by multiply_out_width(), if still valid, else None."""
        entry = self._linear_maps.get(width)
        if entry is None or torch.compiler.is_compiling() or entry[0] != _maps_key(hypernetworks, width, device_type):
            return None
        return entry[2]

    def multiply_out_width(self, hypernetworks, width, device_type, tokens=None):
        key = _maps_key(hypernetworks, width, device_type)
        entry = self._linear_maps.get(width)
        if entry is not None and entry[:2] == (key, tokens):
            return
        maps = []
        for hypernetwork in hypernetworks:
            pair = hypernetwork.pair(width)
            maps.append(None if pair is None else multiply_out(*pair, tokens=tokens))
        self._linear_maps[width] = (key, tokens, maps if any(m is not None for m in maps) else None)

    def new_forward(self):
        if self._value is not None and self._value[0].requires_grad:
            self._context = self._key = self._value = None
        for width, (_, _, maps) in list(self._linear_maps.items()):
            if maps is not None and any(m is not None and m[0].requires_grad for m in maps):
                del self._linear_maps[width]

    def clear(self):
        self._context = self._key = self._value = None
        self._linear_maps.clear()


def _maps_key(hypernetworks, width, device_type):
    return (*_mode_key(device_type), _state_signature(hypernetworks, width))


def _mode_key(device_type):
    autocast = torch.is_autocast_enabled(device_type)
    return torch.is_grad_enabled(), autocast, torch.get_autocast_dtype(device_type) if autocast else None


class HypernetworkAttnProcessor:
    """diffusers' AttnProcessor2_0, with K and V computed from hypernetwork-transformed contexts.

    In self-attention the context is the hidden states themselves, as in A1111.
    """

    def __init__(self, hypernetworks, cache):
        self.hypernetworks = hypernetworks
        self.cache = cache

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)

        folded = None
        if encoder_hidden_states is None:
            linear_maps = self.cache.linear_maps(
                self.hypernetworks, hidden_states.shape[-1], hidden_states.device.type
            )
            folded = fold_into_projections(attn, self.hypernetworks, linear_maps, hidden_states)
            if folded is None:
                context_k, context_v = apply_hypernetworks(self.hypernetworks, hidden_states, linear_maps)
        else:
            if attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            context_k, context_v = self.cache.contexts(self.hypernetworks, encoder_hidden_states)

        if folded is not None:
            key, value = (F.linear(hidden_states, weight, bias) for weight, bias in folded)
        else:
            key = attn.to_k(context_k)
            value = attn.to_v(context_v)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def attention_widths(unet):
    """The context widths the UNet's attention layers feed to K and V (text width and self-attention widths)."""
    return sorted({module.to_k.in_features for module in unet.modules() if isinstance(module, Attention)})


def self_attention_levels(unet):
    """{width: [level, ...]}: one entry per self-attention layer, at level i when it runs on the latent downsampled
    i times (diffusers' UNet2DConditionModel block names), or None where the level cannot be told."""
    down = len(getattr(unet, "down_blocks", ()))
    levels = {}
    for name, module in unet.named_modules():
        if not isinstance(module, Attention) or module.is_cross_attention:
            continue
        block, _, rest = name.partition(".")
        index = rest.partition(".")[0]
        if block == "down_blocks" and index.isdigit():
            level = int(index)
        elif block == "up_blocks" and index.isdigit():
            level = len(unet.up_blocks) - 1 - int(index)
        elif block == "mid_block":
            level = down - 1
        else:
            level = None
        levels.setdefault(module.to_k.in_features, []).append(level)
    return levels


def self_attention_tokens(levels, sample):
    """Tokens one forward on `sample` (batch, channels, height, width) feeds to self-attention at one width."""
    if any(level is None for level in levels) or sample.ndim != 4:
        return None
    batch, _, height, width = sample.shape
    return sum(batch * -(-height // 2**level) * -(-width // 2**level) for level in levels)


class Attachment:
    """Hypernetworks installed in a UNet; detach() (or leaving a `with` block) restores the original processors.

    `hypernetworks` is a live list: reorder, add or remove entries and the next forward uses them.
    """

    def __init__(self, unet, hypernetworks, multiply_out_linear=True):
        self.unet = unet
        self.hypernetworks = list(hypernetworks)
        self.multiply_out_linear = multiply_out_linear
        self.cache = ContextCache()
        self.levels = self_attention_levels(unet)
        self.original_processors = unet.attn_processors
        self.processor = HypernetworkAttnProcessor(self.hypernetworks, self.cache)
        unet.set_attn_processor(self.processor)
        self._hook = unet.register_forward_pre_hook(self._before_unet_forward, with_kwargs=True)

    def _before_unet_forward(self, unet, args, kwargs):
        # Fill the cache before any block runs, so that a block recomputed by gradient checkpointing finds the
        # same tensors as its first run did.
        self.cache.new_forward()
        context = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        if isinstance(context, torch.Tensor):
            self.cache.contexts(self.hypernetworks, context)
        sample = kwargs.get("sample", args[0] if args else None)
        if not self.multiply_out_linear or not isinstance(sample, torch.Tensor) or torch.compiler.is_compiling():
            return
        grad = torch.is_grad_enabled()
        for width, levels in self.levels.items():
            # Without grad the product is kept for as long as the weights do not change: every forward of a
            # generation reuses it. With grad it is made again each forward, so it must pay for itself in one.
            tokens = self_attention_tokens(levels, sample) if grad else None
            if grad and tokens is None:
                continue  # the layers' token count is unknown, so whether multiplying out pays cannot be told
            self.cache.multiply_out_width(self.hypernetworks, width, sample.device.type, tokens)

    def detach(self):
        if self._hook is None:
            return
        self._hook.remove()
        self._hook = None
        self.unet.set_attn_processor(self.original_processors)
        self.cache.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()


def attach(unet, hypernetworks, multiply_out_linear=True):
    """Install hypernetworks, applied in order at their own multipliers, on every attention layer of `unet`.

    With multiply_out_linear, the self-attention modules of a linear hypernetwork run as one matrix each (the same
    function up to float rounding, about a quarter of the arithmetic), folded into to_k and to_v in layers with more
    tokens than channels; pass False to run A1111's layers as they are.
    """
    if not isinstance(hypernetworks, (list, tuple)):
        hypernetworks = [hypernetworks]
    model_widths = attention_widths(unet)
    for hypernetwork in hypernetworks:
        if not set(hypernetwork.widths) & set(model_widths):
            raise WidthMismatchError(
                f"hypernetwork {hypernetwork.name!r} has widths {hypernetwork.widths} but this model's attention "
                f"layers use {model_widths}; it was made for another model family (SD 1.x: 768, SD 2.x: 1024, "
                "SDXL: 2048 text width)"
            )
        device = next(unet.parameters()).device
        if next(hypernetwork.parameters()).device != device:
            hypernetwork.to(device)
    return Attachment(unet, hypernetworks, multiply_out_linear)
