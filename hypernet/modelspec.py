"""Keys that tell other tools what a safetensors file holds: ModelSpec's (https://github.com/Stability-AI/ModelSpec),
which Civitai and UIs read to identify a file, and kohya's training keys (ss_*), which the webui's metadata view and
Civitai show. All values are strings, as safetensors metadata must be."""

import json
from collections import Counter
from datetime import datetime, timezone

MODELSPEC_VERSION = "1.0.0"
# The implementation whose hypernetworks these weights are: the webui's (modules/hypernetworks/hypernetwork.py).
MODELSPEC_IMPLEMENTATION = "https://github.com/AUTOMATIC1111/stable-diffusion-webui"
MODELSPEC_ADAPTER = "hypernetwork"  # as ModelSpec names adapters: ".../lora", ".../textual-inversion"
# Base architecture id (ModelSpec), kohya's ss_base_model_version, and the resolution each family is trained at.
FAMILIES = {
    "sd1": ("stable-diffusion-v1", "sd_v1", 512),
    "sd2": ("stable-diffusion-v2-512", "sd_v2", 512),
    "sd2-v": ("stable-diffusion-v2-768-v", "sd_v2", 768),
    "sdxl": ("stable-diffusion-xl-v1-base", "sdxl_base_v1-0", 1024),
}


def model_family(widths, sdxl=False, prediction_type="epsilon"):
    """The base model family a hypernetwork belongs to: SDXL where the model is one (or its text width, 2048, is
    among the widths), SD 2.x where the text width is 1024 (v-prediction for the 768 model), else SD 1.x, the
    webui's default family."""
    if sdxl or 2048 in widths:
        return "sdxl"
    if 1024 in widths:
        return "sd2-v" if prediction_type == "v_prediction" else "sd2"
    return "sd1"


def modelspec_metadata(hn, file_stem, family=None, resolution=None, prediction_type=None, date=None):
    """ModelSpec keys (https://github.com/Stability-AI/ModelSpec) for a hypernetwork: its architecture is the base
    model's id with the adapter suffix "/hypernetwork", as LoRA files have "/lora"; its title the hypernetwork's
    name; its usage hint the webui's prompt tag, which names the file (`file_stem`). All values are strings."""
    family = family or model_family(hn.widths)
    architecture, _, default_resolution = FAMILIES[family]
    resolution = resolution or default_resolution
    if prediction_type is None:
        prediction_type = "v_prediction" if family == "sd2-v" else "epsilon"
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    metadata = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{architecture}/{MODELSPEC_ADAPTER}",
        "modelspec.implementation": MODELSPEC_IMPLEMENTATION,
        "modelspec.title": hn.config.name or file_stem,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": (date or datetime.now(timezone.utc)).date().isoformat(),
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
        "modelspec.usage_hint": f"<hypernet:{file_stem}:1> in the prompt (AUTOMATIC1111 webui)",
    }
    if hn.config.optional_info:
        metadata["modelspec.description"] = str(hn.config.optional_info)
    return metadata


def tag_frequency(captions):
    """How often each tag occurs in the captions, a tag being a comma-separated part of a caption, stripped, as
    kohya's scripts count them for ss_tag_frequency."""
    counts = Counter()
    for caption in captions:
        counts.update(tag for tag in (part.strip() for part in caption.split(",")) if tag)
    return dict(counts.most_common())


def training_keys(
    family,
    base_model_name,
    base_model_hash,
    resolution,
    steps,
    images,
    tags,
    dataset_name,
    started_at,
    finished_at,
    settings,
):
    """kohya-style training keys (ss_*) where they apply to a hypernetwork, all strings: base model name, version
    and hash (the webui's short hash, as 'Model hash' writes it), resolution, steps, images, the captions' tag
    frequency ({dataset: {tag: count}}), start and end of training (Unix times), and `settings` (ss_NAME: value)."""
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    keys = {
        "ss_base_model_version": FAMILIES[family][1],
        "ss_sd_model_name": base_model_name,
        "ss_sd_model_hash": base_model_hash or "",
        "ss_resolution": f"({width}, {height})",
        "ss_steps": steps,
        "ss_max_train_steps": steps,
        "ss_num_train_images": images,
        "ss_tag_frequency": json.dumps({dataset_name: tags}),
        "ss_training_started_at": started_at,
        "ss_training_finished_at": finished_at,
        **{f"ss_{key}": value for key, value in settings.items()},
    }
    if family == "sd2-v":
        keys["ss_v2"] = True
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in keys.items()}
