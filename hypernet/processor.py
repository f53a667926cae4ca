"""Applying hypernetworks inside a diffusers UNet: the attention processor, attach()/detach(), the context cache."""

import weakref

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from .errors import WidthMismatchError


def apply_hypernetworks(hypernetworks, context):
    """A1111's apply_hypernetworks: each hypernetwork in turn maps the running K and V contexts.

    A hypernetwork without a module for context's width leaves both unchanged.
    """
    context_k = context_v = context
    # Under autocast the matmuls already run in the autocast dtype; casting the context to the weights' dtype and
    # back would only add copies. Without it, compute in the weights' dtype, as A1111 computes in float32.
    autocast = torch.is_autocast_enabled(context.device.type)
    for hypernetwork in hypernetworks:
        pair = hypernetwork.pair(context.shape[-1])
        if pair is None:
            continue
        module_k, module_v = pair
        dtype = context.dtype if autocast else module_k.linear[0].weight.dtype
        context_k = module_k(context_k.to(dtype)).to(context.dtype)
        context_v = module_v(context_v.to(dtype)).to(context.dtype)
    return context_k, context_v


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
    """The K and V contexts computed from the last text context, reused while nothing they depend on changed.

    Cross-attention layers all receive the same text-embedding tensor, in every layer of a forward and at every
    denoising step of a generation, so the text-width MLPs need to run once per prompt, not once per layer and
    step. An entry is keyed by the tensor's identity and version (it is held weakly), grad mode, and the
    hypernetworks' weight versions, multipliers and train/eval mode, so a change to any of those recomputes it.
    Entries that carry an autograd graph live for one UNet forward only (new_forward() drops them), since the
    graph is freed by the backward pass.
    """

    def __init__(self):
        self._context = None
        self._key = None
        self._value = None
        self.misses = 0

    def contexts(self, hypernetworks, context):
        if torch.compiler.is_compiling():
            return apply_hypernetworks(hypernetworks, context)
        key = (
            context._version,
            context.shape,
            context.dtype,
            context.device,
            torch.is_grad_enabled(),
            torch.is_autocast_enabled(context.device.type),
            _state_signature(hypernetworks, context.shape[-1]),
        )
        if self._context is not None and self._context() is context and self._key == key:
            return self._value
        self.misses += 1
        self._value = apply_hypernetworks(hypernetworks, context)
        self._context = weakref.ref(context)
        self._key = key
        return self._value

    def new_forward(self):
        if self._value is not None and self._value[0].requires_grad:
            self.clear()

    def clear(self):
        self._context = self._key = self._value = None


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

        if encoder_hidden_states is None:
            context_k, context_v = apply_hypernetworks(self.hypernetworks, hidden_states)
        else:
            if attn.norm_cross:
                encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
            context_k, context_v = self.cache.contexts(self.hypernetworks, encoder_hidden_states)

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


class Attachment:
    """Hypernetworks installed in a UNet; detach() (or leaving a `with` block) restores the original processors.

    `hypernetworks` is a live list: reorder, add or remove entries and the next forward uses them.
    """

    def __init__(self, unet, hypernetworks):
        self.unet = unet
        self.hypernetworks = list(hypernetworks)
        self.cache = ContextCache()
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


def attach(unet, hypernetworks):
    """Install hypernetworks, applied in order at their own multipliers, on every attention layer of `unet`."""
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
    return Attachment(unet, hypernetworks)
