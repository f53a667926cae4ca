"""What the tests share besides fixtures: paths, the reference files, running the scripts as a user runs them."""

import contextlib
import json
import os
import re
import runpy
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The webui-written reference files, copied from ../shared/a1111 (tests/data/README.md), so that a clone of the
# repository alone passes; tests/test_fixtures.py checks the copies against ../shared/a1111 where it sits beside.
A1111 = os.path.join(ROOT, "tests", "data", "a1111")
SHARED_A1111 = os.path.join(os.path.dirname(ROOT), "shared", "a1111")
CASES = ["case1_default_relu", "case3_layernorm_swish", "case7_old_format", "case8_with_optim"]


def a1111_file(case, suffix=".pt"):
    path = os.path.join(A1111, case + suffix)
    if not os.path.exists(path):
        pytest.fail(f"reference file {path} is missing from the repository's tests/data/a1111")
    return path


def reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def run_script(script, *argv):
    """Run one of the project's scripts in this process, as `python SCRIPT ARGV...` runs it; returns its exit code.
    The script's module (hypernet/scripts/SCRIPT) runs anew each time, so that its names bind to the package as the
    test has patched it. Tests patch the package (never the script) to inject faults."""
    module = "hypernet.scripts." + os.path.splitext(script)[0]
    saved_argv = sys.argv
    sys.argv = [os.path.join(ROOT, script), *map(str, argv)]
    reset_accelerate()
    try:
        runpy.run_module(module, run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved_argv
        reset_accelerate()
    return 0


def train(model_dir, data_dir, output_dir, *flags, steps=6):
    """train_hypernetwork.py on the tiny model with small, fast settings; returns its exit code."""
    argv = [
        "--pretrained_model_name_or_path",
        model_dir,
        "--output_dir",
        output_dir,
        "--resolution",
        "64",
        "--max_train_steps",
        steps,
        "--learning_rate",
        "1e-3",
        "--save_every",
        "0",
        "--preview_every",
        "0",
        "--checkpointing_steps",
        "0",
        "--preview_steps",
        "3",
    ]
    if not any(f in ("--train_data_dir", "--dataset_name") for f in flags):
        argv += ["--train_data_dir", data_dir]
    return run_script("train_hypernetwork.py", *argv, *flags)


def wait_until_training(process):
    """Read a training subprocess's stderr until its first step is about to run."""
    lines = []
    while True:
        line = process.stderr.readline()
        assert line or process.poll() is None, "".join(lines)[-3000:]
        lines.append(line)
        if "training x:" in line:
            return


@contextlib.contextmanager
def small_disk(path, size="1m"):
    """A real tmpfs of `size` at `path` where this machine allows mounting one (root in a container that may),
    else None: the tests then make the writers raise what torch and safetensors raise on a full disk."""
    path.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def read_only_folder(path):
    """A read-only mount at `path` where this machine allows one (root ignores file permissions), else None."""
    path.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted and os.geteuid() != 0:
        os.chmod(path, 0o500)
        mounted = True
    try:
        yield mounted
    finally:
        if mounted and os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def infotext_hashes(parameters):
    """The 'Hashes' field of an infotext as Civitai reads it (its webui extension's pattern: Hashes: {...})."""
    found = re.search(r"Hashes:\s*(\{.*?\})", parameters)
    return json.loads(found.group(1)) if found else {}


# The webui's infotext pattern for the prompt's extra networks as Civitai's extension matches them.
CIVITAI_NETWORK = re.compile(r"<(lora|hypernet):([a-zA-Z0-9_\.\-\s]+):([0-9.]+)(?:[:].*)?>")
