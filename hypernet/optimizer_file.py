"""The .optim companion of a hypernetwork file, as the webui writes it: the optimizer's name and state, and the
short hash of the file it belongs to."""

import math
import os
import warnings
from dataclasses import dataclass

import torch

from .errors import FormatError
from .hashing import shorthash
from .untrusted import MAX_OPTIM_VALUES, check_plain, torch_load_safely

OPTIM_SUFFIX = ".optim"


@dataclass
class OptimizerState:
    """An optimizer's state for a hypernetwork's parameters (in their state_dict order), and its class's name."""

    name: str
    state_dict: dict


def read_optimizer_state(path, parameters):
    """The .optim companion of the hypernetwork file at `path`, where it is a regular file that belongs to this exact
    file (its hash) and fits `parameters` and the optimizer it names; else None, with a warning saying why."""
    optim_path = path + OPTIM_SUFFIX
    if not os.path.lexists(optim_path):
        return None
    try:
        saved = torch_load_safely(optim_path)
        check_plain(saved, optim_path, budget=[MAX_OPTIM_VALUES], tensors=True)
        problem = optimizer_file_problem(saved, path, parameters)
        if not problem:
            problem = optimizer_fit_problem(saved, optim_path, parameters)
    except FormatError as e:
        problem = str(e)
    if problem:
        warnings.warn(f"ignoring optimizer state: {problem}; training restarts the optimizer", stacklevel=3)
        return None
    return OptimizerState(saved.get("optimizer_name") or "AdamW", saved["optimizer_state_dict"])


def optimizer_file_problem(saved, path, parameters):
    """Why a loaded .optim cannot continue training these parameters of the file at `path`, or None if it can."""
    optim_path = path + OPTIM_SUFFIX
    if not isinstance(saved, dict) or not isinstance(saved.get("optimizer_state_dict"), dict):
        return f"{optim_path} holds no optimizer_state_dict"
    if not isinstance(saved.get("optimizer_name", "AdamW"), (str, type(None))):
        return f"{optim_path}: its optimizer_name is not text"
    expected = shorthash(path)
    if saved.get("hash") != expected:
        return (
            f"{optim_path} was saved for another file (hash {str(saved.get('hash'))[:40]!r}, "
            f"{os.path.basename(path)} has {expected})"
        )
    problem = optimizer_state_mismatch(saved["optimizer_state_dict"], parameters)
    return f"{optim_path}: {problem}" if problem else None


def optimizer_fit_problem(saved, optim_path, parameters):
    """Why the saved state does not fit the optimizer it names, built with its own hyperparameters, or None."""
    from .training import optimizer_for_state, optimizer_state_problem

    name = saved.get("optimizer_name") or "AdamW"
    try:
        optimizer = optimizer_for_state(parameters, name, saved["optimizer_state_dict"])
    except ValueError as e:
        return f"{optim_path}: {e}"
    if optimizer is None:
        return None  # a class this installation lacks (bitsandbytes): the structure checked above is all we can say
    problem = optimizer_state_problem(saved["optimizer_state_dict"], optimizer, name)
    return f"{optim_path}: {problem}" if problem else None


OPTIMIZER_LEVEL_STATE = ("qmap", "absmax", "max", "new_max", "unorm", "gnorm")


def optimizer_state_mismatch(state_dict, parameters):
    """Why an optimizer state dict cannot belong to these parameters (the webui's order), or None if it can."""
    groups = state_dict.get("param_groups")
    state = state_dict.get("state")
    if not isinstance(groups, list) or not isinstance(state, dict) or not all(isinstance(g, dict) for g in groups):
        return "not an optimizer state dict (no param_groups/state)"
    indices = []
    for group in groups:
        params = group.get("params")
        if not isinstance(params, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in params):
            return "its param_groups' params are not lists of parameter numbers"
        indices += params
        for key, value in group.items():
            numbers = value if isinstance(value, (list, tuple)) and key != "params" else [value]
            for number in numbers:
                if isinstance(number, float) and not math.isfinite(number):
                    return f"its {key} is {number}"
                if isinstance(number, torch.Tensor) and not torch.isfinite(number).all():
                    return f"its {key} is not finite"
    if len(indices) != len(parameters) or len(set(indices)) != len(indices):
        return f"it is for {len(indices)} parameters, the hypernetwork has {len(parameters)}"
    position = {index: n for n, index in enumerate(indices)}
    for index, values in state.items():
        if index not in position or not isinstance(values, dict):
            return f"it has state for unknown parameter {str(index)[:20]!r}"
        shape = parameters[position[index]].shape
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                if value.layout != torch.strided or value.is_meta:
                    return f"{key} of parameter {index} is not a plain tensor"
                if value.is_floating_point() and not torch.isfinite(value).all():
                    return f"{key} of parameter {index} holds NaN or infinite values"
                # Per-weight state (moments) has the weight's shape; 8-bit AdamW's quantization maps and block
                # scales belong to the optimizer.
                if value.dim() > 0 and not key.startswith(OPTIMIZER_LEVEL_STATE) and value.shape != shape:
                    return f"{key} of parameter {index} has shape {tuple(value.shape)}, the weight has {tuple(shape)}"
            elif isinstance(value, float) and not math.isfinite(value):
                return f"{key} of parameter {index} is {value}"
    return None
