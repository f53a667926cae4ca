"""What the training script and the benches share: the loss, the optimizer, the webui's learning-rate schedules,
the frozen model with the hypernetwork attached."""

import copy
import hashlib
import inspect
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attachment import attach
from .errors import ArgumentError, UsageError, first_line


def parse_schedule(text, name):
    """The webui's schedule syntax: 'rate:until_step, rate:until_step, rate' -> [(rate, until_step or None)].

    Each rate holds until its step; the last one to the end of training where it has no step or the step -1 (the
    webui's "until the end"), else training ends at its step. Rates must be finite and not negative; each until_step
    a whole number above the one before.
    """
    pieces = []
    try:
        for piece in str(text).split(","):
            if not piece.strip():
                continue
            rate, _, until = piece.partition(":")
            pieces.append((float(rate), int(until) if until.strip() else None))
    except ValueError:
        raise UsageError(
            f"{name} {text!r}: expected a number or a schedule such as '5e-5:100, 5e-6:1500, 5e-7'"
        ) from None
    if not pieces:
        raise UsageError(f"{name} is empty")
    if pieces[-1][1] == -1:
        pieces[-1] = (pieces[-1][0], None)
    for rate, until in pieces:
        if not math.isfinite(rate) or rate < 0:
            raise UsageError(f"{name} {text!r}: {rate} is not a finite, non-negative number")
        if until is not None and until < 1:
            raise UsageError(
                f"{name} {text!r}: the step after ':' must be 1 or more (or -1, until the end, on the last rate), "
                f"not {until}"
            )
    steps = [until for _, until in pieces if until is not None]
    if steps != sorted(set(steps)) or any(until is None for _, until in pieces[:-1]):
        raise UsageError(f"{name} {text!r}: the steps must rise, and only the last rate may have none")
    return pieces


def rate_at(schedule, step):
    """The schedule's rate at `step` (0-based): each rate holds until its step, the last one to the end."""
    for rate, until in schedule:
        if until is None or step < until:
            return rate
    return schedule[-1][0]


def schedule_end(schedule):
    """The step a learning-rate schedule ends training at, as the webui's LearnRateScheduler ends it: the last rate's
    step where it has one; None where the last rate holds to the end."""
    return schedule[-1][1]


def sample_noise(shape, generator, noise_offset=0.0):
    """Gaussian noise for latents of `shape` (channels, height, width); with a noise offset, plus
    noise_offset * N(0, 1) per channel, as diffusers' training scripts add it."""
    noise = torch.randn(shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((shape[0], 1, 1), generator=generator)
    return noise


def diffusion_target(noise_scheduler, latents, noise, timesteps):
    """What the UNet learns to predict: the noise, or the velocity for v-prediction models."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise UsageError(f"the model's scheduler predicts {prediction_type!r}; hypernet trains epsilon or v_prediction")


def snr_weights(noise_scheduler, timesteps, snr_gamma):
    """Min-SNR loss weights (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1)
    for v-prediction."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.minimum(snr, torch.full_like(snr, snr_gamma))
    return weights / (snr + 1 if noise_scheduler.config.prediction_type == "v_prediction" else snr)


def diffusion_loss(model, noise_scheduler, batch, snr_gamma=None):
    """MSE between the UNet's prediction and its target, per pixel weighted by batch['weight'] where given, per
    sample by min-SNR where snr_gamma is given."""
    latents, noise, timesteps = batch["latents"], batch["noise"], batch["timesteps"]
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    target = diffusion_target(noise_scheduler, latents, noise, timesteps)
    conditioning = {key: batch[key] for key in ("added_cond_kwargs",) if batch.get(key) is not None}
    prediction = model(
        noisy_latents.to(batch["encoder_hidden_states"].dtype),
        timesteps,
        batch["encoder_hidden_states"],
        **conditioning,
    )
    loss = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if batch.get("weight") is not None:
        loss = loss * batch["weight"]
    loss = loss.mean(dim=list(range(1, loss.ndim)))
    if snr_gamma:
        loss = loss * snr_weights(noise_scheduler, timesteps, snr_gamma)
    return loss.mean()


# torch.optim classes the training loop can drive: step() without a closure, dense gradients.
UNSUPPORTED_OPTIMIZERS = {
    "Optimizer": "the base class",
    "LBFGS": "it needs a closure",
    "SparseAdam": "sparse gradients",
}


def optimizer_class(name, use_8bit=False):
    """The torch.optim class `name` (or with use_8bit bitsandbytes' AdamW8bit), and its name as the .optim records
    it."""
    if use_8bit:
        try:
            import bitsandbytes
        except ImportError:
            raise ArgumentError("use_8bit", "needs bitsandbytes: pip install 'hypernet[bnb]'") from None
        return bitsandbytes.optim.AdamW8bit, "AdamW8bit"
    cls = getattr(torch.optim, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ArgumentError("name", f"{name!r}: not a torch.optim class (e.g. AdamW, Adam, SGD)")
    if name in UNSUPPORTED_OPTIMIZERS:
        raise ArgumentError("name", f"{name}: not supported ({UNSUPPORTED_OPTIMIZERS[name]}); use AdamW, Adam or SGD")
    return cls, name


def make_optimizer(parameters, name="AdamW", use_8bit=False, **settings):
    """(optimizer, its name) with a base learning rate of 1: the scheduler sets the absolute rate at every step.
    Every setting not given (betas, weight_decay, eps, ...) is the class's own default, as the webui creates its
    optimizers; one the class does not take is refused. Fused where torch can."""
    cls, name = optimizer_class(name, use_8bit)
    parameters = list(parameters)
    accepted = inspect.signature(cls.__init__).parameters
    for key, value in settings.items():
        if key not in accepted:
            raise ArgumentError(key, f"{value}: {name} has no {key} setting; leave the flag out")
    return cls(parameters, lr=1.0, **settings, **fused_kwargs(cls, parameters)), name


def optimizer_settings(optimizer):
    """The settings an optimizer was made with, as training_settings.json records them: its defaults but the
    learning rate (the schedule's) and how it computes (fused, foreach, ...)."""
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in optimizer.defaults.items()
        if key not in ("lr", *IMPLEMENTATION_KEYS) and isinstance(value, (int, float, bool, tuple, type(None)))
    }


def fused_kwargs(cls, parameters):
    """fused=True where torch has a fused kernel for this optimizer and these parameters: one kernel for all of them
    instead of several per tensor."""
    supported = "fused" in inspect.signature(cls.__init__).parameters
    on_fused_devices = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in parameters)
    return {"fused": True} if supported and on_fused_devices else {}


def resume_optimizer_state(optimizer, state):
    """Load saved moments and hyperparameters; how this optimizer computes (fused, foreach) stays as it was built,
    whatever the optimizer that saved the state used."""
    implementation = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, keys in zip(optimizer.param_groups, implementation):
        group.update(keys)


# How an optimizer computes, not what it computes: a resumed optimizer keeps its own.
IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def optimizer_for_state(parameters, name, state_dict):
    """A fresh optimizer of the class `name` (as a .optim records it) over copies of `parameters`, with the first
    saved param group's hyperparameters, to check a saved state against; None where the class is unavailable.
    Hyperparameters the class refuses raise ValueError with the reason."""
    try:
        cls, _ = optimizer_class("AdamW", True) if name == "AdamW8bit" else optimizer_class(name)
    except UsageError:
        return None
    accepted = inspect.signature(cls.__init__).parameters
    group = (state_dict.get("param_groups") or [{}])[0]
    kwargs = {k: v for k, v in group.items() if k in accepted and k not in IMPLEMENTATION_KEYS + ("params",)}
    copies = [torch.zeros_like(p, requires_grad=True) for p in parameters]
    try:
        return cls(copies, **kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"its hyperparameters do not make a {name} ({first_line(e)})") from None


def _stepped(optimizer, state_dict=None):
    """A copy of `optimizer` (and of its parameters) after one step on zero gradients, from `state_dict` if given."""
    trial = copy.deepcopy(optimizer)
    if state_dict is not None:
        resume_optimizer_state(trial, copy.deepcopy(state_dict))
    for group in trial.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    trial.step()
    return trial


def _describe(value):
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).replace('torch.', '')} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _count(value):
    if isinstance(value, torch.Tensor):
        return float(value) if value.numel() == 1 and not value.is_complex() else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def optimizer_state_problem(state_dict, optimizer, name):
    """Why a saved optimizer state cannot continue `optimizer` (a `name`), or None if it can: its param groups and
    their order, the switches this optimizer was built with (amsgrad, maximize, nesterov, ...), and each
    parameter's state keys, shapes and dtypes as this optimizer makes them, with finite values; last, one step from
    it. Everything runs on copies: `optimizer` and its parameters are untouched."""
    try:
        expected = _stepped(optimizer).state_dict()
    except Exception:  # an optimizer that cannot step on zero gradients gives no template to check against
        return None
    groups, own_groups = state_dict["param_groups"], expected["param_groups"]
    if len(groups) != len(own_groups):
        return f"it has {len(groups)} parameter groups, this {name} has {len(own_groups)}"
    for group, own in zip(groups, own_groups):
        if list(group["params"]) != list(own["params"]):
            return "its parameters are not in the hypernetwork's order"
        for key, value in own.items():
            if isinstance(value, bool) and key not in IMPLEMENTATION_KEYS and group.get(key, value) != value:
                return f"its {key} is {group.get(key)}, this run's {name} has {value}"
    for index, values in state_dict["state"].items():
        own = expected["state"].get(index, {})
        if set(values) != set(own):
            return (
                f"the state of parameter {index} holds {', '.join(sorted(map(str, values))) or 'nothing'}; "
                f"{name} keeps {', '.join(sorted(own))}"
            )
        for key, value in values.items():
            if key == "step":
                step = _count(value)
                if step is None or not math.isfinite(step) or step < 0:
                    return f"the step of parameter {index} is {value!r}, not a count of steps"
            elif isinstance(own[key], torch.Tensor):
                if _describe(value) != _describe(own[key]):
                    return f"{key} of parameter {index} is {_describe(value)}; {name} keeps {_describe(own[key])}"
                if value.is_floating_point() and not torch.isfinite(value).all():
                    return f"{key} of parameter {index} holds NaN or infinite values"
    try:
        _stepped(optimizer, state_dict)
    except Exception as e:
        return f"it does not load into {name} ({type(e).__name__}: {first_line(e)})"
    return None


def make_lr_scheduler(optimizer, schedule, scheduler_name="constant", warmup_steps=0, initial_step=0, max_steps=1):
    """The learning rate at each step: a webui schedule (or one rate) as the absolute rate, or, for one rate with
    another diffusers scheduler name, that scheduler over the steps from initial_step to max_steps."""
    from diffusers.optimization import get_scheduler

    if len(schedule) > 1 or scheduler_name == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: rate_at(schedule, initial_step + s))
    for group in optimizer.param_groups:
        group["lr"] = schedule[0][0]
    return get_scheduler(
        scheduler_name, optimizer=optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps - initial_step
    )


class UNetWithHypernetwork(torch.nn.Module):
    """The frozen UNet with the hypernetwork attached, as one module, so that DDP wraps a forward that runs the
    hypernetwork and therefore synchronises its gradients. The UNet's frozen parameters stay out of DDP's buckets."""

    def __init__(self, unet, hypernetwork):
        super().__init__()
        self.unet = unet
        self.hypernetwork = hypernetwork
        self.attachment = attach(unet, [hypernetwork])

    def forward(self, noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=None):
        return self.unet(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs).sample


def weights_digest(module):
    """A short sha256 of a module's weights, to compare them between processes."""
    digest = hashlib.sha256()
    for tensor in module.state_dict().values():
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def is_sdxl(path, revision=None):
    """Whether a diffusers folder is SDXL: a UNet conditioned on text and time ids, and a second text encoder."""
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(path, subfolder="unet", revision=revision)
    return config.get("addition_embed_type") == "text_time" and os.path.isdir(os.path.join(path, "text_encoder_2"))


@dataclass
class Models:
    """The frozen parts of a Stable Diffusion model that training uses."""

    tokenizers: list
    text_encoders: list
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object

    @property
    def sdxl(self):
        return len(self.text_encoders) == 2


def load_models(path, revision=None, variant=None, dtype=torch.float32, vae_path=None):
    """Tokenizers, text encoders, VAE, UNet and noise scheduler of an SD 1.x, 2.x or SDXL diffusers folder, frozen,
    in `dtype`. The VAE comes from `vae_path` where given. SDXL's own VAE overflows in fp16, so without `vae_path`
    an SDXL VAE stays float32."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    common = dict(revision=revision, variant=variant)
    sdxl = is_sdxl(path, revision)
    tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)]
    text_encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **common)]
    if sdxl:
        tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", revision=revision))
        text_encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **common))
    if vae_path is None:
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **common)
    else:
        subfolder = "vae" if os.path.isdir(os.path.join(vae_path, "vae")) else None
        vae = AutoencoderKL.from_pretrained(vae_path, subfolder=subfolder)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **common)
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    for model in (*text_encoders, vae, unet):
        model.requires_grad_(False)
        model.eval()
        model.to(dtype=dtype)
    if sdxl and vae_path is None:
        vae.to(dtype=torch.float32)
    return Models(tokenizers, text_encoders, vae, unet, noise_scheduler)


def batch_to_device(samples, models, prompt_encoder, seed, noise_offset, device, dtype):
    """A training batch from the samples a DataLoader worker built: latents (encoded here where the samples hold
    pixels), noise and timesteps drawn from generators keyed by each sample's (seed, epoch, index), prompts encoded
    where their embeddings were not stored, SDXL's added conditioning."""
    from .data import sample_key

    if "pixels" in samples:
        with torch.no_grad():
            dist = models.vae.encode(samples["pixels"].to(device, models.vae.dtype)).latent_dist
        scaling = models.vae.config.scaling_factor
        mean, std = dist.mean.float() * scaling, dist.std.float() * scaling
        latents = (mean + std * samples["latent_noise"].to(device)).to(dtype)
    else:
        latents = samples["latents"].to(device, dtype)
    noises, timesteps = [], []
    num_train_timesteps = models.noise_scheduler.config.num_train_timesteps
    for epoch, index in samples["keys"]:
        generator = torch.Generator().manual_seed(sample_key(seed, 5, epoch, index))
        noises.append(sample_noise(latents.shape[1:], generator, noise_offset))
        timesteps.append(torch.randint(0, num_train_timesteps, (1,), generator=generator))
    if samples.get("encoder_hidden_states") is not None:
        embeddings, pooled = samples["encoder_hidden_states"], samples.get("pooled_embeddings")
    else:
        embeddings, pooled = prompt_encoder.padded(samples["prompts"], samples["chunks"])
    batch = {
        "latents": latents,
        "noise": torch.stack(noises).to(device, dtype),
        "timesteps": torch.cat(timesteps).to(device),
        "encoder_hidden_states": embeddings.to(device, dtype),
        "weight": None if samples.get("weight") is None else samples["weight"].to(device),
    }
    if models.sdxl:
        batch["added_cond_kwargs"] = {
            "text_embeds": pooled.to(device, dtype),
            "time_ids": samples["time_ids"].to(device, dtype),
        }
    return batch
