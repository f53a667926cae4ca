"""PNG files that carry their generation parameters as AUTOMATIC1111 infotext, so the webui's PNG Info reads them."""

import json
from dataclasses import dataclass, field

from PIL import PngImagePlugin

from .errors import ArgumentError
from .files import atomic_write
from .prompts import PROMPT_HYPERNET

# The webui's sampler names -> (the diffusers scheduler class, its options), as diffusers' documentation maps them.
# PNDM, DDPM: diffusers' own, which the webui lacks; Stable Diffusion 1.x's default PNDM scheduler is its "PLMS".
SAMPLERS = {
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {}),
    "PNDM": ("PNDMScheduler", {}),
    "DDPM": ("DDPMScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "LMS Karras": ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "DPM++ 2S a Karras": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}
# The options that tell the webui's samplers of one class apart, at diffusers' defaults.
SAMPLER_OPTIONS = {"use_karras_sigmas": False, "algorithm_type": "dpmsolver++"}


def make_scheduler(name, config):
    """A scheduler for a webui sampler name or a diffusers class name, from a model's scheduler config; one that needs
    a package this environment lacks is an ArgumentError about `sampler`."""
    import diffusers

    class_name, options = SAMPLERS.get(name, (name, {}))
    try:
        return getattr(diffusers, class_name).from_config(config, **options)
    except ImportError as e:
        reason = " ".join(str(e).split()).split(" You can install")[0]
        raise ArgumentError("sampler", f"{name!r}: {reason} (pip install the package it names)") from None


def sampler_name(scheduler):
    """The webui's name of a diffusers scheduler, from its class and options, as infotext writes it (so that the
    webui's PNG Info restores it); the class's own name where the webui has none."""
    config = scheduler.config
    for name, (class_name, options) in SAMPLERS.items():
        wanted = {**SAMPLER_OPTIONS, **options}
        if class_name == type(scheduler).__name__ and all(
            config.get(key, value) == value for key, value in wanted.items()
        ):
            return name
    return type(scheduler).__name__


def infotext(
    prompt,
    negative_prompt="",
    steps=None,
    sampler=None,
    cfg_scale=None,
    seed=None,
    width=None,
    height=None,
    model_hash=None,
    model=None,
    hypernetworks=(),
    clip_skip=1,
):
    """A1111's parameters text: prompt, optional 'Negative prompt:' line, then 'Key: value' pairs.

    hypernetworks: (name, multiplier, short hash or None) for each one applied, in order. The prompt names each as
    the webui's own prompts do, <hypernet:NAME:MULTIPLIER>, so that pasting the text into the webui applies them
    again; 'Hashes' (model and hypernet:NAME, the files' short hashes) is the field Civitai reads to link the files,
    as its webui extension writes it. 'Clip skip' is written where it is above 1, as the webui writes it.
    """
    hashes = {"model": model_hash} if model_hash else {}
    hashes.update({f"hypernet:{name}": sha for name, _, sha in hypernetworks if sha})
    fields = {
        "Steps": steps,
        "Sampler": sampler,
        "CFG scale": cfg_scale,
        "Seed": seed,
        "Size": f"{width}x{height}" if width and height else None,
        "Model hash": model_hash,
        "Model": model,
        "Clip skip": clip_skip if clip_skip > 1 else None,
        "Hashes": json.dumps(hashes) if hashes else None,
    }
    text = " ".join([prompt, *(f"<hypernet:{name}:{m:g}>" for name, m, _ in hypernetworks)]).strip()
    if negative_prompt:
        text += f"\nNegative prompt: {negative_prompt}"
    pairs = ", ".join(f"{key}: {value}" for key, value in fields.items() if value is not None)
    return f"{text}\n{pairs}"


def infotext_prompt(text):
    """An infotext's prompt without its <hypernet:NAME:M> tags, and (NAME, multiplier) of each tag in order."""
    first = text.split("\n", 1)[0]
    tags = [(name, float(m) if m else 1.0) for name, m in PROMPT_HYPERNET.findall(first)]
    return PROMPT_HYPERNET.sub("", first).strip(), tags


@dataclass
class Generation:
    """One image's generation settings: what the pipeline is called with and what its infotext says."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = None
    cfg_scale: float = 7.0
    seed: int = 0
    width: int = None
    height: int = None
    model_hash: str = None
    model: str = None
    hypernetworks: list = field(default_factory=list)  # (name, multiplier, short hash or None)
    clip_skip: int = 1

    def images(self, pipeline, encoder, device, count=1):
        """`count` images of a diffusers text-to-image pipeline, image i with seed + i, the prompts encoded by
        `encoder` (hypernet.prompts.text_to_image)."""
        from .prompts import text_to_image

        return text_to_image(
            pipeline, encoder, self.prompt, self.negative_prompt, **self.pipeline_kwargs(device, count)
        )

    def pipeline_kwargs(self, device, count=1):
        """The sampling arguments of a diffusers text-to-image pipeline call for `count` images, image i with seed + i
        (the prompts are passed encoded: images())."""
        import torch

        return dict(
            num_images_per_prompt=count,
            num_inference_steps=self.steps,
            guidance_scale=self.cfg_scale,
            width=self.width,
            height=self.height,
            generator=[torch.Generator(device).manual_seed(self.seed + i) for i in range(count)],
        )

    def infotext(self):
        return infotext(
            self.prompt,
            self.negative_prompt,
            self.steps,
            self.sampler,
            self.cfg_scale,
            self.seed,
            self.width,
            self.height,
            self.model_hash,
            self.model,
            self.hypernetworks,
            self.clip_skip,
        )


def save_png(image, path, parameters=None):
    """Save a PIL image as PNG with an A1111 'parameters' text chunk, under a temporary name renamed into place."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
