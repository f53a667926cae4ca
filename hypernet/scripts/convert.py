#!/usr/bin/env python
"""Convert hypernetworks between A1111's .pt and safetensors, and inspect them.

    python convert.py style.pt style.safetensors          # format by suffix
    python convert.py style.safetensors style.pt --dtype fp16
    python convert.py hypernetworks/ converted/ --to safetensors   # every file in a folder
    python convert.py --info style.pt [--json]

Every conversion is verified before it is reported: the written file is read back and its outputs are compared with
the input's on a random context for every width; they must be equal (fp32) or within the stated tolerance
(fp16/bf16). The optimizer state companion (FILE.optim, a pickle the webui reads beside a .pt) is carried along to a
.pt with its hash recomputed for the new file, and to a .safetensors only with --optimizer_state.
"""

import argparse
import json
import os
import sys
import tempfile
import warnings

import hypernet
from hypernet.clients import comfyui_verdict, webui_verdict
from hypernet.conversion import TOLERANCE, check_representable, verify
from hypernet.errors import HypernetError, UsageError, printable, run_script
from hypernet.files import write_failure
from hypernet.flags import parse_flags
from hypernet.formats import DTYPES
from hypernet.optimizer_file import OPTIM_SUFFIX
from hypernet.publishing import file_hashes
from hypernet.scripts import HelpFormatter

SUFFIXES = (".pt", ".safetensors")


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(
        description="Convert hypernetworks between .pt and .safetensors, and inspect them.",
        formatter_class=HelpFormatter,
        epilog=f"Tolerances after --dtype, relative to the largest output: {TOLERANCE}.",
    )
    parser.add_argument("input", nargs="?", help="A .pt/.safetensors file, or a folder of them.")
    parser.add_argument("output", nargs="?", help="The file to write (format by suffix), or a folder.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="Store the weights in this precision.")
    parser.add_argument(
        "--to", choices=["pt", "safetensors"], default=None, help="Target format for folders (default: the other one)."
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace existing output files.")
    parser.add_argument(
        "--optimizer_state",
        action="store_true",
        help="Write the optimizer state (FILE.optim, a torch pickle) beside a .safetensors output too; beside a .pt, "
        "where the webui reads it to continue training, it is always written.",
    )
    parser.add_argument("--info", metavar="FILE", default=None, help="Print what a hypernetwork file holds.")
    parser.add_argument("--json", action="store_true", help="With --info: print JSON.")
    args = parse_flags(parser, input_args)
    if args.info is None and (args.input is None or args.output is None):
        parser.error("give INPUT and OUTPUT, or --info FILE")
    return args


def same_file(a, b):
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def convert_file(source, target, dtype_name=None, overwrite=False, optimizer_state=False):
    """Convert one file; return a one-line report. The output (and its .optim) is written and verified in a
    temporary folder beside it and moved into place only when both are good: a failure leaves nothing behind, and
    no file is replaced that was not asked for."""
    if same_file(source, target) or os.path.realpath(source) == os.path.realpath(target):
        raise UsageError(f"{target}: the output must be a different file from the input")
    if not target.endswith(SUFFIXES):
        raise UsageError(f"{target}: name the output .pt or .safetensors")
    for path in (target, target + OPTIM_SUFFIX):
        if os.path.lexists(path) and not overwrite:
            raise UsageError(f"{path}: exists; pass --overwrite to replace it")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = hypernet.read(source, optimizer_state=True)
    hn = loaded.hypernetwork
    check_representable(hn, dtype_name, source)
    dtype = DTYPES[dtype_name] if dtype_name else None
    directory = os.path.dirname(os.path.abspath(target))
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".convert-", dir=directory) as work:
            staged = os.path.join(work, os.path.basename(target))
            carried = loaded.optimizer if target.endswith(".pt") or optimizer_state else None
            hypernet.save(hn, staged, carried, layout=loaded.layout, dtype=dtype)
            worst = verify(hn, staged, dtype_name or "fp32")  # keeping or widening the precision must be exact
            if os.path.exists(staged + OPTIM_SUFFIX):
                os.replace(staged + OPTIM_SUFFIX, target + OPTIM_SUFFIX)
            elif os.path.lexists(target + OPTIM_SUFFIX):
                os.remove(target + OPTIM_SUFFIX)  # --overwrite: the old file's companion would not match the new one
            os.replace(staged, target)
    except OSError as e:
        raise HypernetError(f"{target}: could not write ({write_failure(e, target)})") from None
    notes = []
    if carried is not None:
        notes.append(f"optimizer state carried to {os.path.basename(target)}{OPTIM_SUFFIX}")
    elif loaded.optimizer is not None:
        notes.append("optimizer state left out (a pickle; --optimizer_state writes it beside a .safetensors)")
    elif os.path.lexists(source + OPTIM_SUFFIX):
        reason = str(caught[-1].message) if caught else "unreadable"
        notes.append(f"optimizer state NOT carried ({reason})")
    check = "outputs identical" if worst == 0 else f"outputs within {worst:.1e} (relative)"
    return f"{source} -> {target}: {check}" + "".join(f"; {n}" for n in notes)


def convert_folder(source_dir, target_dir, to=None, dtype_name=None, overwrite=False, optimizer_state=False):
    """Convert every hypernetwork file in a folder; return (reports, skipped files, failures)."""
    files = sorted(f for f in os.listdir(source_dir) if f.lower().endswith(SUFFIXES) and not f.startswith("."))
    if not files:
        raise UsageError(f"{source_dir}: no .pt or .safetensors files")
    reports, skipped, failures = [], [], []
    for name in files:
        stem, suffix = os.path.splitext(name)
        new_suffix = "." + to if to else (".safetensors" if suffix.lower() == ".pt" else ".pt")
        target = os.path.join(target_dir, stem + new_suffix)
        try:
            reports.append(
                convert_file(os.path.join(source_dir, name), target, dtype_name, overwrite, optimizer_state)
            )
        except hypernet.NotAHypernetworkError as e:
            skipped.append(str(e))
        except HypernetError as e:
            failures.append(str(e))
    return reports, skipped, failures


def other_programs_verdict(path):
    if path.endswith(".pt"):
        return "the webui's layout, which hypernetwork loaders read"
    return (
        "ComfyUI, Easy Diffusion and ersatzForge list a .safetensors in a hypernetwork folder and apply nothing from "
        "this layout; give them the .pt (convert.py FILE.safetensors FILE.pt)"
    )


def info(path):
    """What a hypernetwork file holds: its widths and every setting (HypernetworkConfig's, in the webui's order),
    its size, hashes and optimizer state, and what the webui and ComfyUI make of it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = hypernet.read(path, optimizer_state=True)
    hn = loaded.hypernetwork
    hashes = file_hashes(path)
    if loaded.optimizer is not None:
        optimizer = f"present, valid ({loaded.optimizer.name})"
    elif os.path.lexists(path + OPTIM_SUFFIX):
        optimizer = "present, INVALID: " + (str(caught[-1].message) if caught else "unreadable")
    else:
        optimizer = "absent"
    return {
        "file": path,
        "widths": hn.widths,
        **{setting.name: getattr(hn.config, setting.name) for setting in hypernet.HypernetworkConfig.settings()},
        "parameters": sum(p.numel() for p in hn.parameters()),
        "dtype": str(next(hn.parameters()).dtype).replace("torch.", ""),
        "sha256": hashes["sha256"],
        "autov2": hashes["autov2"],  # Civitai's short hash
        "shorthash": hashes["webui"],  # the webui's: its cards, 'Model hash', the .optim's hash
        "optimizer_state": optimizer,
        "webui": webui_verdict(path),
        "comfyui": comfyui_verdict(loaded, path),
        "others": other_programs_verdict(path),
        **{f"metadata.{key}": value for key, value in file_metadata(path).items()},
    }


def file_metadata(path):
    """A .safetensors file's metadata (the ModelSpec keys, kohya's ss_* keys, the hypernetwork's own), by key."""
    if not path.endswith(".safetensors"):
        return {}
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return dict(sorted((f.metadata() or {}).items()))


def main(input_args=None):
    args = parse_args(input_args)
    if args.info:
        fields = info(args.info)
        if args.json:
            print(json.dumps(fields, indent=2))
        else:
            width = max(len(k) for k in fields)
            print("\n".join(f"{k:<{width}}  {printable(v)}" for k, v in fields.items()))
        return 0
    if os.path.isdir(args.input):
        if os.path.exists(args.output) and not os.path.isdir(args.output):
            raise UsageError(f"{args.output}: the input is a folder, so the output must be a folder too")
        reports, skipped, failures = convert_folder(
            args.input, args.output, args.to, args.dtype, args.overwrite, args.optimizer_state
        )
        lines = reports + [f"skipped: {s}" for s in skipped] + [f"FAILED: {f}" for f in failures]
        print("\n".join(printable(line) for line in lines))
        print(f"converted {len(reports)} file(s), skipped {len(skipped)}, {len(failures)} failed")
        return 2 if failures else 0
    if not os.path.exists(args.input):
        raise UsageError(f"{args.input}: no such file or folder")
    print(printable(convert_file(args.input, args.output, args.dtype, args.overwrite, args.optimizer_state)))
    return 0


def cli():
    return run_script(main)


if __name__ == "__main__":
    sys.exit(cli())
