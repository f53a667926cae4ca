"""What a hypernetwork carries to where users take it: file hashes as Civitai and the webui list them, ModelSpec and
kohya-style training keys for safetensors files, the webui's Extra Networks card files, and the Hub's model card."""

import json
import os
import re
import shutil

from PIL import Image

from .files import atomic_write, atomic_writes
from .hashing import cached_sha256
from .images import save_png

HUB_TAGS = ["hypernetwork", "diffusers-training", "text-to-image", "stable-diffusion", "hypernet"]


def file_hashes(path):
    """The hashes a file is known by: its sha256; Civitai's AutoV2 (the sha256's first 10 hex digits); the webui's
    short hash (modules/hashes.py: the same 10 digits, shown on its cards and written as 'Model hash')."""
    sha256 = cached_sha256(path)
    return {"sha256": sha256, "autov2": sha256[:10], "webui": sha256[:10]}


def card_description(base_model_name, steps, images, settings):
    """The one paragraph a card shows: base model, steps, dataset size and the settings that matter."""
    shown = ", ".join(f"{key} {value}" for key, value in settings.items())
    return f"Hypernetwork trained on {base_model_name} for {steps} steps on {images} images; {shown}."


def write_card_files(hypernetwork_path, preview_path, description, notes, infotext=None):
    """Beside NAME.pt, what the webui's Extra Networks page reads for its card (modules/ui_extra_networks.py):
    NAME.preview.png, the first of the preview names it looks for that its own "replace preview" writes, and
    NAME.json, its user metadata, whose "description" the card shows and whose "notes" its editor shows.

    `infotext`: the preview's parameters text where they should name this file rather than the one the preview was
    made with. Returns the paths written."""
    stem = os.path.splitext(os.fspath(hypernetwork_path))[0]
    written = []
    if preview_path is not None:
        card_preview = stem + ".preview.png"
        if infotext is None:
            with atomic_write(card_preview) as tmp:
                shutil.copyfile(preview_path, tmp)
        else:
            with Image.open(preview_path) as image:
                save_png(image.copy(), card_preview, infotext)
        written.append(card_preview)
    user_metadata = stem + ".json"
    metadata = {"description": description, "notes": notes}
    try:
        with open(user_metadata, encoding="utf8") as f:
            kept = json.load(f)  # what a user wrote in the webui's editor stays
        if isinstance(kept, dict):
            metadata = {**kept, "description": description, "notes": notes}
    except (OSError, ValueError):
        pass
    with atomic_writes([user_metadata]) as (tmp,), open(tmp, "w", encoding="utf8") as f:
        json.dump(metadata, f, indent=4, ensure_ascii=False)
    written.append(user_metadata)
    return written


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def model_card(
    name,
    base_model,
    description,
    previews,
    settings,
    files,
    hub_model_id=None,
):
    """The model card (README.md with YAML front matter) of a run's folder, as diffusers' training scripts make it
    (ModelCardData, populate_model_card): the base model where it is a Hub id, tags, the previews as the widget,
    the settings, and how to use the hypernetwork in the webui, ComfyUI and diffusers.

    previews: (prompt, path relative to the folder) pairs. files: the folder's files to list, relative paths."""
    from diffusers.utils.hub_utils import populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    hub_base = base_model if HUB_ID.match(base_model) and not os.path.exists(base_model) else None
    data = ModelCardData(
        base_model=hub_base,
        library_name="diffusers",
        inference=False,
        widget=[{"text": prompt, "output": {"url": path}} for prompt, path in previews] or None,
    )
    gallery = "\n".join(f"![{prompt}]({path})" for prompt, path in previews)
    rows = "\n".join(f"| {key} | {value} |" for key, value in settings.items())
    listing = "\n".join(f"- `{path}`" for path in files)
    repo = hub_model_id or "USER/REPO"
    load_base = f"pipeline = DiffusionPipeline.from_pretrained({json.dumps(hub_base or 'BASE_MODEL')})"
    if not hub_base:  # a local folder or file: its path means nothing elsewhere
        load_base += f"  # BASE_MODEL: {os.path.basename(os.path.normpath(base_model))}'s Hub id or folder"
    body = f"""
# {name}

{description}

{gallery}

## Use it

**AUTOMATIC1111 webui:** copy `{name}.pt` (and `{name}.preview.png`, `{name}.json` for its card) into
`models/hypernetworks/` and write `<hypernet:{name}:1>` in the prompt; the number is its multiplier.

**ComfyUI:** copy `{name}.pt` into `models/hypernetworks/` and load it with the *HypernetworkLoader* node, its
strength 1.0, between the checkpoint loader and the sampler.

Forge and reForge list and load the file but never apply it (the hypernetwork call in their attention code is
commented out); SD.Next and InvokeAI have no hypernetwork support.

**diffusers**, with this project's `hypernet` library:

```python
import hypernet
from diffusers import DiffusionPipeline
from huggingface_hub import hf_hub_download

{load_base}
style = hypernet.load(hf_hub_download({json.dumps(repo)}, {json.dumps(name + ".pt")})).set_multiplier(1.0)
with hypernet.attach(pipeline.unet, [style], merge=True):
    image = pipeline({json.dumps(previews[0][0] if previews else "a picture")}).images[0]
```

## Training settings

| setting | value |
|---|---|
{rows}

## Files

{listing}
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    return populate_model_card(card, tags=list(HUB_TAGS))


# What a pushed run folder leaves out: accelerate checkpoints, tracker logs, the intermediate hypernetworks, the lock,
# and, unless asked for, the optimizer state (a pickle, for continuing training).
PUSH_IGNORED = ["checkpoint-*", "logs/*", "wandb/*", "hypernetworks/*", ".*", "*/.*"]
OPTIMIZER_STATE = "*.optim"
SETTINGS_FILE = "training_settings.json"


def hub_files(folder, extra=(), optimizer_state=False):
    """The files of a run's folder that a push uploads (relative paths, sorted), and `extra` ones to be written."""
    from huggingface_hub.utils import filter_repo_objects

    paths = [
        os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
        for root, _, names in os.walk(folder)
        for name in names
    ]
    ignored = PUSH_IGNORED + ([] if optimizer_state else [OPTIMIZER_STATE])
    return sorted(set(filter_repo_objects(paths, ignore_patterns=ignored)) | set(extra))


def shareable(value, folder):
    """A setting as it may leave this machine: a path inside the run's folder relative to it, any other local path
    reduced to its name."""
    if isinstance(value, list):
        return [shareable(item, folder) for item in value]
    if not isinstance(value, str) or not (os.path.isabs(value) or os.sep in value and os.path.exists(value)):
        return value
    inside = os.path.relpath(os.path.abspath(value), os.path.abspath(folder))
    return inside if not inside.startswith("..") else os.path.basename(os.path.normpath(value))


def push_folder(repo_id, folder, token=None, optimizer_state=False):
    """Upload a run's folder to the Hub repository `repo_id`, as diffusers' scripts upload theirs: the files
    hub_files names, training_settings.json with its local paths made shareable."""
    import tempfile

    from huggingface_hub import upload_folder

    with tempfile.TemporaryDirectory(prefix="hypernet-push-") as staging:
        for path in hub_files(folder, optimizer_state=optimizer_state):
            os.makedirs(os.path.dirname(os.path.join(staging, path)), exist_ok=True)
            if path == SETTINGS_FILE:
                with open(os.path.join(folder, path)) as f:
                    settings = {key: shareable(value, folder) for key, value in json.load(f).items()}
                with open(os.path.join(staging, path), "w") as f:
                    json.dump(settings, f, indent=2)
            else:
                os.symlink(os.path.abspath(os.path.join(folder, path)), os.path.join(staging, path))
        upload_folder(
            repo_id=repo_id, folder_path=staging, commit_message="End of training", ignore_patterns=[], token=token
        )
