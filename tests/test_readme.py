"""The README and docs/ stay true: their commands run (scaled down to the tiny model), and every flag and file they
name exists."""

import os
import re
import shlex
import subprocess
import sys

import pytest
from helpers import ROOT, a1111_file
from PIL import Image

import hypernet

pytestmark = pytest.mark.slow

SCRIPTS = ["train_hypernetwork.py", "generate.py", "convert.py", "examples/make_tiny_model.py"]
# Run where the project runs them: CI (quickstart, install, tests) or only on a cluster.
NOT_RUN_HERE = (
    "bash examples/quickstart.sh",
    "python -m pytest",
    "pip install",
    "sbatch ",
    "--config_file",
    "torchrun ",
)


def readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def documents():
    """The README and every page of docs/, one text."""
    texts = [readme()]
    for name in sorted(os.listdir(os.path.join(ROOT, "docs"))):
        if name.endswith(".md"):
            with open(os.path.join(ROOT, "docs", name)) as f:
                texts.append(f.read())
    return "\n".join(texts)


def code_blocks(text, language):
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def commands(block):
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip() and not c.startswith("#")]


def help_text(script):
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def helps():
    return {script: help_text(script) for script in SCRIPTS}


def flags_of(command):
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*", command))


def script_of(command):
    return next((s for s in SCRIPTS if os.path.basename(s) in command), None)


def test_every_flag_named_in_the_readme_and_examples_exists(helps):
    text = documents()
    checked = 0
    sources = [c for b in code_blocks(text, "bash") for c in commands(b)]
    for name in os.listdir(os.path.join(ROOT, "examples")):
        if name.endswith((".sh", ".sbatch")):
            with open(os.path.join(ROOT, "examples", name)) as f:
                sources += [c for c in commands(f.read()) if script_of(c)]
    for command in sources:
        script = script_of(command)
        if script is None:
            continue
        own = command[command.index(os.path.basename(script)) :]
        for flag in flags_of(own):
            assert re.search(rf"(?<![\w-]){flag}\b", helps[script]), (
                f"{flag} (in: {command[:80]}...) not in {script} --help"
            )
            checked += 1
    # Flags in the prose and tables, the README's and docs/'s, belong to train_hypernetwork.py, generate.py or
    # convert.py.
    union = " ".join(helps.values())
    for flag in flags_of(text.replace("--index-url", "")):
        if flag in (
            "--config_file",
            "--machine_rank",
            "--main_process_ip",
            "--nnodes",
            "--nproc_per_node",
            "--node_rank",
            "--master_addr",
            "--master_port",
            "--max_restarts",
            "--signal",
            "--requeue",
        ):
            continue  # accelerate launch's, torchrun's and Slurm's own
        assert re.search(rf"(?<![\w-]){flag}\b", union), f"README names {flag}, which no script has"
        checked += 1
    assert checked > 80


def test_every_file_the_readme_points_to_exists():
    for path in re.findall(r"`((?:examples|docs|bench)/[\w./-]+)`", documents()):
        assert os.path.exists(os.path.join(ROOT, path)), path


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, tiny_model_dir, sdxl_model_dir, small_dataset):
    """A folder laid out like the README's examples, backed by the tiny model and a small dataset."""
    import shutil

    import hypernet

    root = tmp_path_factory.mktemp("readme")
    (root / "models").mkdir()
    os.symlink(tiny_model_dir, root / "models" / "stable-diffusion-v1-5")
    os.symlink(sdxl_model_dir, root / "models" / "stable-diffusion-xl-base-1.0")
    (root / "data").mkdir()
    os.symlink(small_dataset, root / "data" / "my-style")
    os.symlink(os.path.join(ROOT, "examples"), root / "examples")
    shutil.copy(a1111_file("case1_default_relu"), root / "my-style.pt")
    hypernet.save(hypernet.load(a1111_file("case3_layernorm_swish")), root / "other.safetensors")
    (root / "hypernetworks").mkdir()
    shutil.copy(a1111_file("case8_with_optim"), root / "hypernetworks" / "a.pt")
    return root


def scaled_down(command):
    """The README's command on the tiny model: small sizes, few steps, `python` for `accelerate launch`."""
    command = command.replace("accelerate launch ", "python ")
    command = re.sub(r"--resolution \d+", "--resolution 64", command)
    few_steps = "--max_train_steps 3 --preview_every 0 --save_every 2"
    command = re.sub(r"--max_train_steps \d+", few_steps, command)
    if "train_hypernetwork.py" in command and "--max_train_steps" not in command:
        command += " " + few_steps  # a command that trains to the schedule's end
    command = re.sub(r"--num_images \d+", "--num_images 2", command)
    if "generate.py" in command:
        command += " --num_inference_steps 2 --no_progress"
    words = shlex.split(command)
    script = script_of(command)
    words[0:2] = [sys.executable, os.path.join(ROOT, script)]
    return words


def test_readme_commands_run(sandbox):
    ran = []
    for block in code_blocks(documents(), "bash"):
        for command in commands(block):
            if command.startswith(NOT_RUN_HERE) or "...same flags..." in command or command.endswith("..."):
                continue
            if command == guide_first_run():
                continue  # test_a_newcomer_follows_the_guide_to_their_own_before_after_grid runs it
            result = subprocess.run(scaled_down(command), cwd=sandbox, capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, f"{command}\n{result.stderr[-2000:]}"
            ran.append(command.split()[1] if command.startswith("python") else command.split()[2])
    assert ran.count("train_hypernetwork.py") == 2 and ran.count("generate.py") == 2 and ran.count("convert.py") == 4
    assert os.path.isfile(sandbox / "outputs" / "my-style" / "my-style.pt")
    assert hypernet.load(sandbox / "outputs" / "my-xl-style" / "my-xl-style.pt").widths == [96, 80, 160]
    assert len([f for f in os.listdir(sandbox / "out") if f.endswith(".png")]) >= 3
    assert os.path.isfile(sandbox / "converted" / "a.safetensors")


def test_readme_python_snippet_runs(sandbox):
    (snippet,) = code_blocks(readme(), "python")
    result = subprocess.run(
        [sys.executable, "-c", snippet + "\nimage.save('snippet.png')"],
        cwd=sandbox,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert os.path.getsize(sandbox / "snippet.png") > 0


def test_example_scripts_run(sandbox, tiny_model_dir):
    env = dict(
        os.environ,
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        MODEL=tiny_model_dir,
        OUT=str(sandbox / "wandb-run"),
        IN=str(sandbox / "my-style.pt"),
    )
    for script in ("examples/wandb.sh", "examples/convert.sh"):
        result = subprocess.run(
            ["bash", os.path.join(ROOT, script)], cwd=sandbox, env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, f"{script}\n{result.stderr[-2000:]}"
    assert os.path.isfile(sandbox / "wandb-run" / "images" / "wandb-run-10.png")
    assert os.path.isdir(sandbox / "wandb-run" / "wandb") and not os.path.exists(sandbox / "wandb")
    assert os.path.isfile(sandbox / "quickstart" / "converted" / "quick-style-fp16.pt")


@pytest.mark.parametrize(
    "command, script",
    [
        ("hypernet-train", "train_hypernetwork.py"),
        ("hypernet-generate", "generate.py"),
        ("hypernet-convert", "convert.py"),
    ],
)
def test_installed_commands_are_the_scripts(command, script, helps):
    import shutil
    from importlib.metadata import version

    import hypernet

    path = shutil.which(command)
    assert path, f"{command} is not installed: pip install -e . (the README's first command does)"
    result = subprocess.run([path, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith(f"usage: {command} ")
    assert flags_of(result.stdout) == flags_of(helps[script])
    assert version("hypernet") == hypernet.__version__, "one source for the version"


def guide_first_run():
    with open(os.path.join(ROOT, "docs", "own-data.md")) as f:
        (command,) = commands(code_blocks(f.read(), "bash")[0])
    return command


def test_a_newcomer_follows_the_guide_to_their_own_before_after_grid(sandbox):
    """docs/own-data.md's first run on a folder of one's own, then the command its last lines give."""
    words = scaled_down(guide_first_run().replace("--max_train_steps 2000", "--max_train_steps 2"))
    words += ["--resolution", "64", "--preview_steps", "4"]
    run = subprocess.run(words, cwd=sandbox, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    grid = next(line.split(": ", 1)[0].strip() for line in lines if "before-after.png: " in line)
    assert grid == os.path.join("outputs", "first-try", "first-try.before-after.png")
    assert os.path.isfile(sandbox / grid) and os.path.isfile(sandbox / grid.replace(".png", ".json"))
    assert any("prompts not in the captions:" in line and "multiplier 1: " in line for line in lines)
    command = lines[lines.index("next:") + 1].strip()
    result = subprocess.run(scaled_down(command), cwd=sandbox, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    made = [n for n in os.listdir(sandbox / "outputs" / "first-try" / "generated") if not n.startswith("grid-")]
    with Image.open(sandbox / "outputs" / "first-try" / "generated" / made[0]) as image:
        assert "<hypernet:first-try:1>" in image.info["parameters"]
