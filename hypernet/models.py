"""The one way a base model is found: a diffusers folder, a single .safetensors/.ckpt checkpoint of SD 1.x, 2.x or
SDXL (as the webui and kohya's scripts take it), or a Hub id, each checked before anything heavy loads and resolved
to a local diffusers folder that every part of hypernet reads.

A single file's family is recognised from its own tensors. diffusers' `from_single_file` converts it once, with the
configs of a diffusers folder (`config`), an original .yaml (`original_config`), or its family's default configs
from the Hugging Face cache, into a folder in hypernet's cache named by the file's hash; later runs reuse it. The
webui's name and short hash of the model are the file's own (ResolvedModel.name, .short_hash).
"""

import fcntl
import json
import os
import secrets
import shutil
from dataclasses import dataclass

from .errors import ArgumentError
from .hashing import base_model_hash, cached_sha256, hash_cache_path, weights_files

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
# diffusers' default config repositories for each family (diffusers.loaders.single_file_utils)
DEFAULT_CONFIGS = {
    "sd1": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd2": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}


@dataclass(frozen=True)
class ResolvedModel:
    """folder: the local diffusers folder to load from; source: what was given; name and short_hash: the model as
    the webui names it (a checkpoint file's stem and the first 10 hex digits of its sha256)."""

    folder: str | None
    source: str
    name: str
    short_hash: str | None
    family: str | None = None  # a single file's: sd1, sd2 or sdxl

    def webui_hash(self):
        """The short hash the webui shows for the model: a checkpoint file's own; for a folder, the same hash of its
        UNet's weights (hashing.base_model_hash)."""
        return self.short_hash or base_model_hash(self.folder)


def checkpoint_keys(path):
    """The tensor names of a checkpoint file, read without loading its tensors where the format allows; None where
    the file is not a checkpoint at all."""
    if path.endswith(".safetensors") or not path.endswith(CHECKPOINT_SUFFIXES[1:]):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as f:
                return list(f.keys()), f.metadata() or {}
        except (SafetensorError, OSError, ValueError, RuntimeError):
            if path.endswith(".safetensors"):
                return None, {}
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a pickle that needs code, or bytes that are no checkpoint: both refused alike
        return None, {}
    state = state.get("state_dict", state) if isinstance(state, dict) else {}
    return [key for key in state if isinstance(key, str)], {}


def checkpoint_family(keys):
    """sd1, sd2 or sdxl from a checkpoint's tensor names (the original LDM/SGM layout the webui loads), else None."""
    has = lambda prefix: any(key.startswith(prefix) for key in keys)  # noqa: E731
    if not has("model.diffusion_model.") or not has("first_stage_model."):
        return None
    if has("conditioner.embedders.1."):
        return "sdxl"
    if has("cond_stage_model.model."):
        return "sd2"
    if has("cond_stage_model.transformer."):
        return "sd1"
    return None


def what_it_is(keys, metadata):
    """A few words on a file that is not a Stable Diffusion checkpoint, from its tensor names."""
    if any(key.startswith(("lora_unet_", "lora_te", "lora.")) or ".lora_" in key for key in keys):
        return "a LoRA"
    if metadata.get("hypernet.format") or any(key.split(".", 1)[0].isdigit() for key in keys[:8]):
        return "a hypernetwork"
    if keys and all(key.startswith("model.diffusion_model.") for key in keys):
        return "a UNet alone (no VAE or text encoder)"
    return f"{len(keys)} tensors such as {keys[0]!r}" if keys else "no tensors"


def check_folder(folder, argument):
    """A diffusers folder of SD 1.x, 2.x or SDXL with every part training and generation load: each model's config
    and weights, each tokenizer's vocabulary and merges, the scheduler's config; one line naming what is missing."""
    index_path = os.path.join(folder, "model_index.json")
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except FileNotFoundError:
        raise ArgumentError(
            argument,
            f"{folder}: not a diffusers folder (no model_index.json); give a diffusers folder of SD 1.x, 2.x or "
            "SDXL, or a .safetensors/.ckpt checkpoint file",
        ) from None
    except (OSError, ValueError) as e:
        raise ArgumentError(argument, f"{index_path}: not a readable JSON file ({e})") from None
    parts = [name for name in ("unet", "vae", "text_encoder", "text_encoder_2") if index.get(name, [None])[0]]
    for part in ("unet", "vae", "text_encoder"):
        if part not in parts:
            raise ArgumentError(argument, f"{folder}: model_index.json names no {part}; it is not a Stable Diffusion")
    for part in parts:
        if not os.path.isfile(os.path.join(folder, part, "config.json")):
            raise ArgumentError(argument, f"{folder}: {part}/config.json is missing; the folder is incomplete")
        if not weights_files(folder, part):
            raise ArgumentError(
                argument,
                f"{folder}: {part}/ has no weights (.safetensors or .bin); the folder is incomplete: download or "
                "convert it again",
            )
    tokenizers = ["tokenizer", "tokenizer_2"] if "text_encoder_2" in parts else ["tokenizer"]
    for tokenizer in tokenizers:
        check_tokenizer(folder, tokenizer, argument)
    if not os.path.isfile(os.path.join(folder, "scheduler", "scheduler_config.json")):
        raise ArgumentError(
            argument, f"{folder}: scheduler/scheduler_config.json is missing; the folder is incomplete"
        )


def check_tokenizer(folder, tokenizer, argument):
    """A CLIP tokenizer with a vocabulary: tokenizer.json, or vocab.json and merges.txt; without one every prompt
    would become unknown tokens."""
    directory = os.path.join(folder, tokenizer)
    fast, slow = os.path.join(directory, "tokenizer.json"), os.path.join(directory, "vocab.json")
    path = fast if os.path.isfile(fast) else slow
    try:
        with open(path, encoding="utf-8") as f:
            vocab = json.load(f)
    except FileNotFoundError:
        raise ArgumentError(
            argument, f"{folder}: {tokenizer}/ has no tokenizer.json or vocab.json, so no prompt could be tokenized"
        ) from None
    except (OSError, ValueError) as e:
        raise ArgumentError(argument, f"{path}: not a readable tokenizer file ({e})") from None
    if path == fast:
        vocab = vocab.get("model", {}).get("vocab") if isinstance(vocab, dict) else None
    elif not os.path.isfile(os.path.join(directory, "merges.txt")) or not os.path.getsize(
        os.path.join(directory, "merges.txt")
    ):
        raise ArgumentError(argument, f"{folder}: {tokenizer}/merges.txt is missing or empty")
    if not isinstance(vocab, dict) or len(vocab) < 3:
        raise ArgumentError(argument, f"{path}: an empty vocabulary, so no prompt could be tokenized")


def models_cache():
    """Where converted single files go: beside the hash cache ($HYPERNET_CACHE_DIR, else ~/.cache/hypernet)."""
    return os.path.join(os.path.dirname(hash_cache_path()), "models")


def resolve_model(path, config=None, original_config=None, revision=None, argument="path", convert=True):
    """The ResolvedModel of `path` (a diffusers folder, a single checkpoint file, or a Hub id), checked; a single
    file is converted once (see the module's docstring), unless convert is False: then its folder is None. Errors
    are ArgumentErrors about `argument`, `config` or `original_config`."""
    if config is not None and not os.path.isdir(config):
        raise ArgumentError("config", f"{config}: no such folder (give a diffusers folder of the model's family)")
    if original_config is not None and not os.path.isfile(original_config):
        raise ArgumentError("original_config", f"{original_config}: no such file (give the checkpoint's .yaml)")
    if os.path.isdir(path):
        check_folder(path, argument)
        return ResolvedModel(path, path, os.path.basename(os.path.normpath(path)), None)
    if os.path.isfile(path):
        return resolve_checkpoint(path, config, original_config, argument, convert)
    if os.path.exists(path) or os.path.isabs(path) or path.startswith(".") or path.count("/") != 1:
        raise ArgumentError(
            argument,
            f"{path}: no such folder or file (give a diffusers folder, a .safetensors/.ckpt checkpoint, or a Hub id "
            "such as stable-diffusion-v1-5/stable-diffusion-v1-5)",
        )
    return resolve_hub_id(path, revision, argument)


def resolve_hub_id(repo_id, revision, argument):
    from huggingface_hub import snapshot_download

    try:
        # The parts' configs, tokenizers and plain weights; not the single-file checkpoints some repositories hold
        # beside them, nor their variants.
        parts = ["model_index.json", "*/*.json", "*/*.txt", "*/model.safetensors", "*/model-*-of-*.safetensors"]
        parts += ["*/diffusion_pytorch_model.safetensors", "*/diffusion_pytorch_model-*-of-*.safetensors"]
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=parts)
    except Exception as e:  # no network, no such repository, a gated one: one line each
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArgumentError(argument, f"{repo_id}: cannot be had from the Hugging Face Hub ({reason})") from None
    check_folder(folder, argument)
    return ResolvedModel(folder, repo_id, repo_id.split("/")[-1], None)


def resolve_checkpoint(path, config, original_config, argument, convert=True):
    keys, metadata = checkpoint_keys(path)
    if keys is None:
        raise ArgumentError(
            argument,
            f"{path}: not a checkpoint hypernet can read (neither safetensors nor a torch checkpoint of weights "
            "alone); give a .safetensors or .ckpt Stable Diffusion checkpoint",
        )
    family = checkpoint_family(keys)
    if family is None:
        raise ArgumentError(
            argument,
            f"{path}: not a Stable Diffusion checkpoint (it holds {what_it_is(keys, metadata)}); give an SD 1.x, "
            "2.x or SDXL checkpoint, or a diffusers folder",
        )
    digest = cached_sha256(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    if not convert:
        return ResolvedModel(None, path, stem, digest[:10], family)
    folder = os.path.join(models_cache(), f"{family}-{digest[:16]}")
    if config is not None:
        check_folder(config, "config")
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        os.makedirs(models_cache(), exist_ok=True)
        # The processes of a run (and runs side by side) wait for one conversion instead of each making its own.
        with open(folder + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not os.path.isfile(os.path.join(folder, "model_index.json")):
                convert_checkpoint(path, family, folder, config, original_config, argument)
    return ResolvedModel(folder, path, stem, digest[:10], family)


def convert_checkpoint(path, family, folder, config, original_config, argument):
    """The checkpoint written as a diffusers folder at `folder` (under a temporary name, renamed when whole)."""
    import diffusers

    cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
    kwargs = {"config": config} if config else {"original_config": original_config} if original_config else {}
    if not kwargs and not default_configs_cached(family):
        raise ArgumentError(
            argument,
            f"{path}: an {FAMILY_NAMES[family]} checkpoint, but its diffusers configs ({DEFAULT_CONFIGS[family]}) "
            "are not in the Hugging Face cache and nothing is downloaded: pass --config a diffusers folder of an "
            f"{FAMILY_NAMES[family]} model, or --original_config the checkpoint's .yaml",
        )
    if family != "sdxl":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipeline = cls.from_single_file(path, local_files_only=True, torch_dtype=checkpoint_dtype(path), **kwargs)
    except Exception as e:  # a file diffusers cannot convert with these configs: one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArgumentError(argument, f"{path}: diffusers cannot convert it ({reason})") from None
    staging = f"{folder}.{secrets.token_hex(4)}.tmp"
    try:
        pipeline.save_pretrained(staging, safe_serialization=True)
        try:
            os.rename(staging, folder)
        except OSError:
            if not os.path.isfile(os.path.join(folder, "model_index.json")):  # not another process's conversion
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def default_configs_cached(family):
    """Whether the family's default diffusers configs are in the Hugging Face cache (diffusers would otherwise try
    to download them, even when told to use local files only)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(DEFAULT_CONFIGS[family], "model_index.json"), str)


def checkpoint_dtype(path):
    """The dtype of a .safetensors checkpoint's UNet weights (an fp16 file converts to an fp16 folder), else None."""
    if not path.endswith(".safetensors"):
        return None
    import torch
    from safetensors import safe_open

    dtypes = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            if key.startswith("model.diffusion_model."):
                return dtypes.get(f.get_slice(key).get_dtype())
    return None
