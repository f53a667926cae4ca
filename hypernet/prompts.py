"""The webui's prompt syntax for hypernetworks: <hypernet:NAME:STRENGTH>, NAME looked up in one folder."""

import math
import os
import re

from .errors import UsageError

PROMPT_HYPERNET = re.compile(r"<hypernet:([^:>]+)(?::([^>]*))?>")
MAX_MULTIPLIER = 100.0


def parse_multiplier(text, where, example="NAME:0.8"):
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{where}: the strength after ':' must be a number, as in {example}") from None
    if not math.isfinite(value) or abs(value) > MAX_MULTIPLIER:
        raise UsageError(
            f"{where}: the strength must be a finite number from -{MAX_MULTIPLIER:g} to {MAX_MULTIPLIER:g}"
        )
    return value


def hypernetworks_in(directory):
    """{name: path} of the hypernetwork files directly inside a folder, by stem, as the webui lists them (.pt first)."""
    if not os.path.isdir(directory):
        return {}
    found = {}
    for suffix in (".safetensors", ".pt"):
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if name.lower().endswith(suffix) and not name.startswith(".") and os.path.isfile(path):
                found[name[: -len(suffix)]] = path
    return found


def parse_prompt(prompt, hypernetwork_dir, available=None):
    """Remove <hypernet:NAME:M> tags from a prompt; return (clean prompt, [(path, multiplier), ...]). NAME is looked up
    only among the files directly inside hypernetwork_dir, never as a path, as the webui looks it up."""
    available = hypernetworks_in(hypernetwork_dir) if available is None else available
    found = []
    for name, multiplier in PROMPT_HYPERNET.findall(prompt):
        tag = f"<hypernet:{name}{':' + multiplier if multiplier else ''}>"
        value = parse_multiplier(multiplier, f"prompt tag {tag}") if multiplier else 1.0
        if name not in available:
            names = ", ".join(sorted(available)[:20]) or "none"
            raise UsageError(
                f"prompt tag {tag}: no hypernetwork {name!r} in --hypernetwork_dir {hypernetwork_dir} (it has: {names})"
            )
        found.append((available[name], value))
    clean = re.sub(r"\s{2,}", " ", PROMPT_HYPERNET.sub("", prompt)).strip(" ,")
    return clean, found
