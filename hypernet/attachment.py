"""Hypernetworks on a diffusers UNet: each attention layer's to_k and to_v wrapped, as peft wraps a Linear.

The webui's rule is k = to_k(context + mlp_k(context)·m) and v = to_v(context + mlp_v(context)·m), applied by
the context's width, so a wrapper around to_k and to_v needs no attention processor: SDPA, attention slicing,
xformers, IP-Adapter and any custom processor keep working.

A linear hypernetwork (the webui's default activation) is an affine map per module, x + F.linear(x, m, c), its
"linear map". Linear maps let a self-attention layer apply K and V modules with one (w, w) product each, fold them
into to_k/to_v where the layer's tokens outnumber its width, and, merged for inference, bake every stacked linear
hypernetwork into the projections once so that a generation costs what the plain UNet costs.

Merging is explicit, as peft's merge()/unmerge(): `attachment.merge()` bakes the hypernetworks as they are now,
`unmerge()` drops the baked weights, `with attachment.merged():` does both. A merged attachment refuses to train,
and to run on hypernetworks changed after merge() (the list, a multiplier, train/eval, weights written in place):
it raises and says to merge() again or unmerge(). Weights written past autograd's version counter (through .data,
by a fused or 8-bit optimizer) need merge() again without being told.
"""

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

from .errors import ArgumentError, HypernetError, UsageError, WidthMismatchError
from .memory import same_layout
from .module import Hypernetwork, HypernetworkModule

K, V = 0, 1


def apply_side(hypernetworks, context, side, maps=None):
    """The context after the K (side 0) or V (side 1) module of each hypernetwork in turn, as the webui applies them.

    A hypernetwork without a module for the context's width passes it through. maps[i], where given and not None,
    is hypernetwork i's (K, V) linear maps, used instead of running its layers.
    """
    # Under autocast the matmuls already run in the autocast dtype; casting to the weights' dtype and back would
    # only add copies. Without it, compute in the weights' dtype, as the webui computes in float32.
    autocast = torch.is_autocast_enabled(context.device.type)
    out = context
    for i, hypernetwork in enumerate(hypernetworks):
        pair = hypernetwork.pair(context.shape[-1])
        if pair is None:
            continue
        module = pair[side]
        x = out.to(context.dtype if autocast else module.linear[0].weight.dtype)
        if maps is not None and maps[i] is not None:
            weight, bias = maps[i][side]
            out = (x + F.linear(x, weight, bias)).to(context.dtype)
        else:
            out = module(x).to(context.dtype)
    return out


def apply_side_in_graph(hypernetworks, context, side):
    """apply_side for a compiled block: a linear module runs as its linear map, made in the graph, where the context
    has more tokens than its width (then the map, made in each layer, costs less than the layers it replaces). Both
    sides' maps are written; the compiler drops the side this projection does not use."""
    width, tokens = context.shape[-1], context.shape[:-1].numel()
    maps = []
    for hypernetwork in hypernetworks:
        pair = hypernetwork.pair(width)
        linear = pair is not None and tokens > width and all(module.is_linear for module in pair)
        maps.append((pair[K].linear_map(), pair[V].linear_map()) if linear else None)
    return apply_side(hypernetworks, context, side, maps)


def apply_hypernetworks(
    hypernetworks: Sequence[Hypernetwork], context: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The webui's apply_hypernetworks: the (K, V) contexts after every hypernetwork in turn."""
    hypernetworks = check_hypernetworks(hypernetworks)
    if not isinstance(context, torch.Tensor) or not context.is_floating_point():
        kind = f"a {context.dtype} tensor" if isinstance(context, torch.Tensor) else type(context).__name__
        raise ArgumentError("context", f"{kind}: give a floating-point tensor (batch, tokens, width)")
    return apply_side(hypernetworks, context, K), apply_side(hypernetworks, context, V)


def linear_maps(hypernetworks, width, tokens=None):
    """Per hypernetwork, its (K, V) modules at `width` as linear maps, or None where it has none there or is not
    linear; None for all where no hypernetwork gets one. With `tokens` (the self-attention tokens of one forward at
    this width) a map is made only where it costs less than the multiply-adds it saves over those tokens."""
    maps = []
    for hypernetwork in hypernetworks:
        pair = hypernetwork.pair(width)
        if pair is None or not all(module.is_linear for module in pair):
            maps.append(None)
            continue
        if tokens is not None:
            weights = [layer.weight for layer in pair[K].linears]
            per_token = sum(w.numel() for w in weights)
            if tokens * (per_token - width * width) <= (per_token - weights[0].numel()) * width:
                maps.append(None)
                continue
        maps.append((pair[K].linear_map(), pair[V].linear_map()))
    return maps if any(m is not None for m in maps) else None


def all_linear(hypernetworks, width):
    """Whether every hypernetwork module at `width` is linear as it runs now."""
    pairs = [hypernetwork.pair(width) for hypernetwork in hypernetworks]
    return all(module.is_linear for pair in pairs if pair is not None for module in pair)


def fold(weight, bias, maps):
    """(W', b') with F.linear(x, W', b') == F.linear(x_after_maps, W, b), for affine maps x + F.linear(x, m, c)
    applied in order: to_k(x + F.linear(x, m, c)) == F.linear(x, W + W @ m, W @ c + b)."""
    for map_weight, map_bias in reversed(maps):  # the last map applied is the first folded in
        bias = F.linear(map_bias, weight, bias)
        weight = weight + weight @ map_weight
    return weight, bias


def attention_widths(unet: nn.Module) -> list[int]:
    """The context widths the UNet's attention layers feed to K and V (text width and self-attention widths)."""
    return sorted({module.to_k.in_features for module in unet.modules() if isinstance(module, Attention)})


def attention_widths_from_config(folder, subfolder="unet", revision=None):
    """The attention widths of a diffusers folder's UNet, from its config alone (built on the meta device), in the
    webui's order: the text width first, then the self-attention widths (SD 1.x 768, 320, 640, 1280; SDXL 2048,
    640, 1280)."""
    from diffusers import UNet2DConditionModel

    try:
        config = UNet2DConditionModel.load_config(folder, subfolder=subfolder, revision=revision)
    except (OSError, ValueError) as e:
        raise UsageError(f"{folder}: not a diffusers Stable Diffusion folder ({str(e).splitlines()[0]})") from None
    with torch.device("meta"):
        widths = attention_widths(UNet2DConditionModel.from_config(config))
    return sorted(widths, key=lambda width: (width != config.get("cross_attention_dim"), width))


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


def stack_fingerprint(hypernetworks):
    """What the output of a stack of hypernetworks depends on, as a value that changes when it does: which
    hypernetworks in which order, their mode and multipliers, and each weight's identity, storage and version, which
    every in-place write through autograd moves on (load_state_dict, copy_, torch's optimizers but the fused ones).
    Writes that bypass the version counter (through .data, fused AdamW, bitsandbytes) are not seen."""
    return tuple(
        (
            id(hn),
            hn.training,
            tuple(module.multiplier for module in hn.modules() if isinstance(module, HypernetworkModule)),
            tuple((id(p), p.data_ptr(), p.dtype, p._version) for p in hn.parameters()),
        )
        for hn in hypernetworks
    )


class _Forward:
    """What one UNet forward shares between its layers: the text context's K and V outputs, and the linear maps of
    each self-attention width; made for the hypernetworks as `fingerprint` describes them."""

    def __init__(self, fingerprint):
        self.fingerprint = fingerprint
        self.context = None
        self.contexts = None
        self.maps = {}


class HypernetworkProjection(nn.Module):
    """An attention layer's to_k (side 0) or to_v (side 1), fed the context after each hypernetwork's K or V module.

    The original layer is `base_layer`, untouched; detach() puts it back. `plain_forward` is the webui's rule as it
    reads; `fast_forward` gets the same result (up to float rounding) by a cheaper route where one applies.
    """

    def __init__(self, base_layer, side, attachment):
        super().__init__()
        self.base_layer = base_layer
        self.side = side
        self.attachment = attachment
        # The projection with the stack baked in, made by Attachment.merge(); made again in the same tensors where
        # it can be, so that a compiled block reads the new weights without compiling again.
        self.merged_weight = None
        self.merged_bias = None

    @property
    def in_features(self):
        return self.base_layer.in_features

    @property
    def out_features(self):
        return self.base_layer.out_features

    def forward(self, x, *args, **kwargs):
        hypernetworks = self.attachment.hypernetworks
        if not any(hypernetwork.pair(x.shape[-1]) is not None for hypernetwork in hypernetworks):
            return self.base_layer(x, *args, **kwargs)
        if torch.compiler.is_compiling():
            return self.compiled_forward(x, *args, **kwargs)
        out = self.fast_forward(x, *args, **kwargs)
        return self.plain_forward(x, *args, **kwargs) if out is None else out

    def plain_forward(self, x, *args, **kwargs):
        """to_k/to_v of the context after each hypernetwork's K or V module in turn, as the webui computes it."""
        return self.base_layer(apply_side(self.attachment.hypernetworks, x, self.side), *args, **kwargs)

    def fast_forward(self, x, *args, **kwargs):
        """The same by a cheaper route, or None where none applies: the merged projection; the text context's K/V
        output that the UNet's forward made once for every cross-attention layer; this forward's linear maps,
        folded into the projection where that costs less, else applied as one product per module."""
        attachment, hypernetworks = self.attachment, self.attachment.hypernetworks
        plain = not args and not kwargs
        if attachment.is_merged and self.merged_weight is not None and plain:
            return F.linear(x, self.merged_weight, self.merged_bias)
        state = attachment.forward_state()
        if state is None:
            return None
        if state.context is not None and x is state.context:
            return self.base_layer(state.contexts[self.side], *args, **kwargs)
        maps = state.maps.get(x.shape[-1])
        if maps is None:
            return None
        folded = self.folded(hypernetworks, maps, x) if plain else None
        if folded is not None:
            return F.linear(x, *folded)
        return self.base_layer(apply_side(hypernetworks, x, self.side, maps), *args, **kwargs)

    def compiled_forward(self, x, *args, **kwargs):
        """forward in a compiled block, where what a UNet forward shares is read, never made: the merged weights;
        the text context's outputs the UNet's forward hook made once; else the modules, linear ones as linear maps
        made in the graph and folded into the projection where that costs less."""
        attachment, hypernetworks = self.attachment, self.attachment.hypernetworks
        plain = not args and not kwargs
        if attachment.is_merged and self.merged_weight is not None and plain:
            return F.linear(x, self.merged_weight, self.merged_bias)
        state = attachment._state  # made for this very forward by the hook
        if state is not None and state.context is not None and x is state.context:
            return self.base_layer(state.contexts[self.side], *args, **kwargs)
        if not attachment.use_linear_maps:
            return self.plain_forward(x, *args, **kwargs)
        width = x.shape[-1]
        modules = [hn.pair(width)[self.side] for hn in hypernetworks if hn.pair(width) is not None]
        if plain and type(self.base_layer) is nn.Linear and all(module.is_linear for module in modules):
            # Where folding does not pay, the graph never uses these maps and the compiler drops them.
            folded = self.fold_in([module.linear_map() for module in modules], x)
            if folded is not None:
                return F.linear(x, *folded)
        return self.base_layer(apply_side_in_graph(hypernetworks, x, self.side), *args, **kwargs)

    def foldable(self, hypernetworks, maps, width):
        """The linear maps of this side for every hypernetwork at `width`, or None where one is missing or the base
        layer is not a plain Linear (a LoRA or quantized layer keeps its own forward)."""
        if maps is None or type(self.base_layer) is not nn.Linear:
            return None
        applying = [m for hypernetwork, m in zip(hypernetworks, maps) if hypernetwork.pair(width) is not None]
        if any(m is None for m in applying):
            return None
        return [m[self.side] for m in applying]

    def folded(self, hypernetworks, maps, x):
        """to_k/to_v's weight and bias with this forward's linear maps folded in, where that costs less."""
        side_maps = self.foldable(hypernetworks, maps, x.shape[-1])
        return None if side_maps is None else self.fold_in(side_maps, x)

    def fold_in(self, side_maps, x):
        """to_k/to_v's weight and bias with these (weight, bias) maps of its side folded in, where that costs less
        than applying them to x's tokens; else None."""
        width, out, tokens = x.shape[-1], self.base_layer.out_features, x.shape[:-1].numel()
        if torch.is_grad_enabled() and any(weight.requires_grad for weight, _ in side_maps):
            # Multiply-adds besides the projection: applied to the tokens, 3 tokens·w² (forward, the map's gradient,
            # the input's); folded, 2 out·w² (W @ m and its gradient) + tokens·out·w (the folded W's gradient).
            pays = tokens * width * (3 * width - out) > 2 * out * width * width
        else:
            pays = tokens > out
        if not pays:
            return None
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = x.dtype if autocast else side_maps[0][0].dtype
        base = self.base_layer
        bias = None if base.bias is None else base.bias.to(dtype)
        weight, bias = fold(base.weight.to(dtype), bias, [(m.to(dtype), c.to(dtype)) for m, c in side_maps])
        return weight.to(x.dtype), None if bias is None else bias.to(x.dtype)

    @torch.no_grad()
    def merge(self, hypernetworks):
        """Bake the stack into merged_weight/merged_bias, in the tensors it had where their layout allows; where a
        hypernetwork at this width is not linear or the base layer is not a plain Linear, drop them."""
        merged = self.merged_weights(hypernetworks)
        if merged is None:
            self.merged_weight = self.merged_bias = None
        elif same_layout(self.merged_weight, merged[0]) and same_layout(self.merged_bias, merged[1]):
            self.merged_weight.copy_(merged[0])
            if merged[1] is not None:
                self.merged_bias.copy_(merged[1])
        else:
            self.merged_weight, self.merged_bias = merged

    def merged_weights(self, hypernetworks):
        """to_k/to_v's weight and bias with every hypernetwork at its width folded in, or None where that cannot be."""
        width = self.base_layer.in_features
        side_maps = self.foldable(hypernetworks, linear_maps(hypernetworks, width), width)
        if side_maps is None:
            return None
        base = self.base_layer
        dtype = torch.promote_types(base.weight.dtype, torch.float32)  # fp16/bf16 models merge in float32
        bias = None if base.bias is None else base.bias.to(dtype)
        weight, bias = fold(base.weight.to(dtype), bias, [(m.to(dtype), c.to(dtype)) for m, c in side_maps])
        return weight.to(base.weight.dtype), None if bias is None else bias.to(base.weight.dtype)

    def unmerge(self):
        self.merged_weight = self.merged_bias = None


def _what_changed(before, now, hypernetworks):
    """Which change between two stack fingerprints, in words."""
    if [entry[0] for entry in before] != [entry[0] for entry in now]:
        return "the list of hypernetworks changed"
    for i, (hn, a, b) in enumerate(zip(hypernetworks, before, now)):
        name = f"hypernetwork {hn.config.name!r}" if hn.config.name else f"hypernetwork {i + 1} of {len(now)}"
        if a[1] != b[1]:
            return f"{name} was put in {'training' if b[1] else 'eval'} mode"
        if a[2] != b[2]:
            return f"{name}'s multiplier changed"
        if a[3] != b[3]:
            return f"{name}'s weights changed"
    return "the hypernetworks changed"


class Attachment:
    """Hypernetworks installed in a UNet; detach() (or leaving a `with` block) restores the original to_k/to_v.

    `hypernetworks` is a live list: reorder, add or remove entries and the next forward uses them (after merge()
    again, where the attachment is merged).
    """

    def __init__(self, unet: nn.Module, hypernetworks: Sequence[Hypernetwork], use_linear_maps: bool = True):
        self.unet = unet
        self.hypernetworks = list(hypernetworks)
        self.is_merged = False  # a plain bool: compiled blocks read it, and a guard on a bool never recompiles
        self.merged_fingerprint = None  # the stack as merge() baked it
        self.use_linear_maps = use_linear_maps
        # False runs the text-context modules in every cross-attention layer, as the webui does (for comparison).
        self.text_context_once = True
        self.levels = self_attention_levels(unet)
        self._state = None
        self._in_forward = False
        self.projections = []
        self.blocks = [module for module in unet.modules() if type(module).__name__ in REPEATED_BLOCKS]
        for attn in attention_layers(unet):
            for side, name in ((K, "to_k"), (V, "to_v")):
                projection = HypernetworkProjection(getattr(attn, name), side, self)
                setattr(attn, name, projection)
                self.projections.append((attn, name, projection))
        self._hooks = [
            unet.register_forward_pre_hook(self._before_unet_forward, with_kwargs=True),
            unet.register_forward_hook(self._after_unet_forward, always_call=True),
        ]

    @property
    def compiled(self) -> bool:
        """Whether the UNet's repeated blocks, where every attention layer sits, are compiled (compile_blocks, or
        diffusers' compile_repeated_blocks): their layers then run the modules or the merged weights as a graph, and
        the UNet's forward prepares nothing for them."""
        return any(getattr(block, "_compiled_call_impl", None) is not None for block in self.blocks)

    def trainable(self) -> bool:
        """Whether any of its hypernetworks' parameters requires grad."""
        return any(p.requires_grad for hn in self.hypernetworks for p in hn.parameters())

    def forward_state(self):
        """What this UNet forward shares between its layers; outside the forward (a block that gradient
        checkpointing recomputes in the backward), only while the hypernetworks are as it was made for."""
        state = self._state
        if state is None or self._in_forward or state.fingerprint == stack_fingerprint(self.hypernetworks):
            return state
        return None

    def check_merged(self, fingerprint: tuple) -> None:
        """Raise where a merged attachment would compute something other than its hypernetworks as they are now
        (`fingerprint`, their stack_fingerprint)."""
        if torch.is_grad_enabled() and self.trainable():
            raise HypernetError(
                "the attachment is merged, so its hypernetworks cannot train: call attachment.unmerge() before "
                "training (and merge() again for inference)"
            )
        if fingerprint != self.merged_fingerprint:
            raise HypernetError(
                f"{_what_changed(self.merged_fingerprint, fingerprint, self.hypernetworks)} since the attachment "
                "was merged: call attachment.merge() again to bake them as they are now, or unmerge()"
            )

    def _before_unet_forward(self, unet, args, kwargs):
        # Made before any block runs, so that a block recomputed by gradient checkpointing finds the same tensors
        # as its first run did. Replaced at the next forward: nothing outlives it into another one.
        self._state = None
        if torch.compiler.is_compiling():
            return
        fingerprint = stack_fingerprint(self.hypernetworks)
        if self.is_merged:
            self.check_merged(fingerprint)
        self._in_forward = True
        state = _Forward(fingerprint)
        context = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        if isinstance(context, torch.Tensor) and self.text_context_once:
            if not (self.is_merged and all_linear(self.hypernetworks, context.shape[-1])):
                state.context, state.contexts = context, apply_hypernetworks(self.hypernetworks, context)
        sample = kwargs.get("sample", args[0] if args else None)
        if self.compiled:
            self._state = state  # compiled blocks make their own linear maps in the graph
            return
        if self.use_linear_maps and isinstance(sample, torch.Tensor):
            grad = torch.is_grad_enabled()
            for width, levels in self.levels.items():
                if self.is_merged and all_linear(self.hypernetworks, width):
                    continue  # merged into the projections
                # With grad the maps are made again each forward, so they must pay for themselves in one.
                tokens = self_attention_tokens(levels, sample) if grad else None
                if grad and tokens is None:
                    continue  # the layers' token count is unknown, so whether a map pays cannot be told
                maps = linear_maps(self.hypernetworks, width, tokens)
                if maps is not None:
                    state.maps[width] = maps
        self._state = state

    def _after_unet_forward(self, unet, args, output):
        self._in_forward = False
        if not torch.is_grad_enabled():
            self._state = None  # no backward will recompute a block of this forward

    @torch.no_grad()
    def merge(self) -> "Attachment":
        """Bake the hypernetworks, as they are now, into to_k/to_v for inference: where every hypernetwork at a
        projection's width is linear, it runs as one Linear, the plain UNet's arithmetic. Call it again after
        changing the hypernetworks (their list, multipliers, weights or mode): until then the UNet refuses to run,
        and it refuses to train while merged."""
        for _, _, projection in self.projections:
            projection.merge(self.hypernetworks)
        self.merged_fingerprint = stack_fingerprint(self.hypernetworks)
        self.is_merged = True
        return self

    def unmerge(self) -> "Attachment":
        """Drop the merged weights: the projections run the hypernetworks' modules again."""
        self.is_merged, self.merged_fingerprint = False, None
        for _, _, projection in self.projections:
            projection.unmerge()
        return self

    @contextlib.contextmanager
    def merged(self) -> Iterator["Attachment"]:
        """`with attachment.merged():` runs the block merged, and unmerges at its end."""
        self.merge()
        try:
            yield self
        finally:
            self.unmerge()

    def detach(self) -> None:
        """Restore the UNet: its original to_k/to_v modules and no hooks (also what leaving a `with` block does)."""
        if not self._hooks:
            return
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for attn, name, projection in self.projections:
            setattr(attn, name, projection.base_layer)
            projection.unmerge()
        self.projections = []
        self.is_merged, self.merged_fingerprint, self._state = False, None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()


# The UNet blocks that hold the attention layers, repeated through the model: what regional compilation compiles
# (diffusers' UNet2DConditionModel._repeated_blocks).
REPEATED_BLOCKS = ("BasicTransformerBlock",)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


def compile_blocks(
    unet: nn.Module, mode: str = "default", fullgraph: bool = False, backend: str = "inductor"
) -> nn.Module:
    """Regional compilation: torch.compile each of the UNet's repeated transformer blocks in place, as diffusers'
    compile_repeated_blocks does, with any hypernetwork wrappers inside them (attach before or after). Blocks of one
    shape share their compiled code, so compiling costs a few blocks' worth, once. mode: "default",
    "reduce-overhead" (CUDA graphs, where shapes stay the same), "max-autotune"."""
    if mode not in COMPILE_MODES:
        raise UsageError(f"torch.compile mode {mode!r}: use one of {', '.join(COMPILE_MODES)}")
    blocks = [module for module in unet.modules() if type(module).__name__ in REPEATED_BLOCKS]
    if not blocks:
        raise UsageError(f"this UNet has no {' or '.join(REPEATED_BLOCKS)} to compile")
    for block in blocks:
        block.compile(mode=None if mode == "default" else mode, fullgraph=fullgraph, backend=backend)
    return unet


def attention_layers(unet):
    layers = [module for module in unet.modules() if isinstance(module, Attention)]
    for attn in layers:
        if getattr(attn, "fused_projections", False) and "Fused" in type(attn.processor).__name__:
            raise HypernetError(
                "this UNet's attention layers use fused QKV projections, which hypernetworks cannot wrap; call "
                "unet.unfuse_qkv_projections() (or pipeline.unfuse_qkv_projections()) before attaching"
            )
        if isinstance(attn.to_k, HypernetworkProjection):
            raise HypernetError(
                "this UNet already has hypernetworks attached; detach() them first, or change the attachment's "
                "hypernetworks list"
            )
    return layers


def check_widths(hypernetwork, model_widths, what=None):
    """Raise WidthMismatchError where `hypernetwork` has no width that the model's attention layers use."""
    if not set(hypernetwork.widths) & set(model_widths):
        raise WidthMismatchError(
            f"{what or f'hypernetwork {hypernetwork.config.name!r}'} has widths {hypernetwork.widths} but this model's "
            f"attention layers use {list(model_widths)}; it was made for another model family (text width: SD 1.x "
            "768, SD 2.x 1024, SDXL 2048)"
        )


TEXT_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


def unused_widths(hypernetwork, model_widths, what=None):
    """One line where some of the hypernetwork's widths match no attention layer of the model, so that their modules
    never apply (an SD 1.x file on SD 2.x applies its self-attention modules alone); None where every width does."""
    unused = [w for w in hypernetwork.widths if w not in model_widths]
    applied = [w for w in hypernetwork.widths if w in model_widths]
    if not unused or not applied:
        return None
    family = next((TEXT_WIDTHS[w] + " " for w in model_widths if w in TEXT_WIDTHS), "")
    named = ", ".join(f"{w} (the {TEXT_WIDTHS[w]} text width)" if w in TEXT_WIDTHS else str(w) for w in unused)
    return (
        f"{what or f'hypernetwork {hypernetwork.config.name!r}'}: its width{'s' * (len(unused) > 1)} {named} "
        f"match{'es' * (len(unused) == 1)} no attention layer of this {family}model (widths {list(model_widths)}), "
        f"so only its modules for {', '.join(map(str, applied))} apply; it was made for another model family"
    )


def check_hypernetworks(hypernetworks):
    """A Hypernetwork, or a list or tuple of them, as a list; anything else (a file's name, None) is refused."""
    items = list(hypernetworks) if isinstance(hypernetworks, (list, tuple)) else [hypernetworks]
    for item in items:
        if not isinstance(item, Hypernetwork):
            hint = ": load it first, hypernet.load(path)" if isinstance(item, (str, os.PathLike)) else ""
            raise ArgumentError("hypernetworks", f"{item!r:.60} is a {type(item).__name__}, not a Hypernetwork{hint}")
    return items


def attach(
    unet: nn.Module, hypernetworks: Sequence[Hypernetwork], merge: bool = False, use_linear_maps: bool = True
) -> Attachment:
    """Wrap every attention layer's to_k and to_v of `unet` so that the hypernetworks apply, in order, each at its own
    multiplier; the attention processors stay as they are.

    merge=True bakes the hypernetworks into the projections for inference (see Attachment.merge). With
    use_linear_maps, linear hypernetworks' self-attention modules run as one matrix each and fold into to_k/to_v
    where a layer's tokens outnumber its width (the same function up to float rounding); pass False to run the
    webui's layers as they are.
    """
    hypernetworks = check_hypernetworks(hypernetworks)
    model_widths = attention_widths(unet)
    device = next(unet.parameters()).device
    for hypernetwork in hypernetworks:
        check_widths(hypernetwork, model_widths)
        if message := unused_widths(hypernetwork, model_widths):
            warnings.warn(message, stacklevel=2)
        if next(hypernetwork.parameters()).device != device:
            hypernetwork.to(device)
    attachment = Attachment(unet, hypernetworks, use_linear_maps=use_linear_maps)
    return attachment.merge() if merge else attachment
