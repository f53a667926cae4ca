"""generate.py under prompts and flags shared by other people: no black image, one line each, nothing replaced, and
Ctrl-C or SIGTERM ends in one line saying what was written."""

import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, run_script
from PIL import Image

from hypernet.errors import UsageError
from hypernet.prompts import MAX_EMPHASIS, parse_emphasis


def generate(capsys, model, out, *flags):
    """(exit code, stderr) of generate.py on the tiny model."""
    capsys.readouterr()
    argv = [
        "--pretrained_model_name_or_path",
        model,
        "--output_dir",
        out,
        "--num_inference_steps",
        "2",
        "--no_progress",
    ]
    code = run_script("generate.py", *argv, *flags)
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    "prompt",
    [
        "(bad:99999999999999999999999999999999999999)",
        "(" * 5000 + "deep",
        "((a red circle:50):50)",
        "[(x:-1000000)]",
    ],
)
def test_emphasis_no_one_means_is_one_line_before_the_model_loads(
    tiny_model_dir, tmp_path, capsys, monkeypatch, prompt
):
    import diffusers

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    for flags in (["--prompt", prompt], ["--prompt", "a cat", "--negative_prompt", prompt]):
        code, err = generate(capsys, tiny_model_dir, tmp_path / "o", *flags)
        assert code == 2 and "\n" not in err and "no such weight can be meant" in err, err
    assert not (tmp_path / "o").exists() or not os.listdir(tmp_path / "o")


def test_emphasis_within_the_bound_is_the_webuis():
    assert parse_emphasis(f"(a:{MAX_EMPHASIS:g})") == [("a", MAX_EMPHASIS)]
    assert parse_emphasis("((((a))))")[0][1] == pytest.approx(1.1**4)
    with pytest.raises(UsageError, match=r"'a' has the emphasis weight 1000, beyond 100 either way"):
        parse_emphasis("(a:1000)")


@pytest.mark.parametrize("scale", ["1e38", "101", "inf", "nan", "-1"])
def test_a_guidance_scale_no_one_means_is_refused(tiny_model_dir, tmp_path, capsys, scale):
    code, err = generate(capsys, tiny_model_dir, tmp_path / "o", "--prompt", "a cat", "--guidance_scale", scale)
    assert code == 2 and "\n" not in err and f"--guidance_scale {float(scale)}: must be from 0 to 100" in err, err


def test_a_non_finite_image_stops_with_one_line_and_writes_nothing(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Whatever makes the latents overflow (a model in fp16, a hypernetwork trained to NaN): no black PNG."""
    import diffusers

    decode = diffusers.AutoencoderKL.decode

    def overflowing(self, latents, *args, **kwargs):
        return decode(self, latents * float("inf"), *args, **kwargs)

    monkeypatch.setattr(diffusers.AutoencoderKL, "decode", overflowing)
    code, err = generate(capsys, tiny_model_dir, tmp_path / "o", "--prompt", "a red circle", "--num_images", "2")
    assert code == 2 and err.endswith(
        "prompt 'a red circle': the image turned NaN or infinite while it was generated, and was not written; "
        "lower the guidance scale or the prompt's emphasis weights, or generate in float32"
    ), err
    assert not [n for n in os.listdir(tmp_path / "o") if n.endswith(".png")]


def test_a_second_run_adds_its_grid_and_replaces_nothing(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "o"
    for seed in (0, 5):
        assert generate(capsys, tiny_model_dir, out, "--prompt", "a cat", "--num_images", "2", "--seed", seed)[0] == 0
    names = sorted(os.listdir(out))
    assert names == ["00000-0.png", "00001-1.png", "00002-5.png", "00003-6.png", "grid-00000.png", "grid-00002.png"]
    first, second = (np.asarray(Image.open(out / n)) for n in ("grid-00000.png", "grid-00002.png"))
    assert not np.array_equal(first, second), "each run's grid shows its own images"


@pytest.mark.slow
@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "SIGTERM")])
def test_ctrl_c_and_sigterm_say_what_was_written(tiny_model_dir, tmp_path, signum, code, word):
    out = tmp_path / "o"
    argv = [sys.executable, os.path.join(ROOT, "generate.py"), "--pretrained_model_name_or_path", tiny_model_dir]
    argv += ["--output_dir", out, "--prompt", "a cat", "--num_images", "400", "--num_inference_steps", "2"]
    process = subprocess.Popen([str(a) for a in argv], stderr=subprocess.PIPE, text=True)
    try:
        while not (out.is_dir() and len(os.listdir(out)) >= 2):
            assert process.poll() is None, process.stderr.read()[-2000:]
        process.send_signal(signum)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    # a progress bar's last refresh may share the line the message starts (each refresh begins with \r)
    parts = [
        part[part.find("generate.py: ") :] if "generate.py: " in part else part for part in re.split(r"[\r\n]", err)
    ]
    lines = [part for part in parts if part.strip() and "it/s" not in part and "%|" not in part]
    written = len([n for n in os.listdir(out) if n.endswith(".png")])
    assert process.returncode == code
    assert (
        lines[-1]
        == f"generate.py: {'stopped by SIGTERM' if word == 'SIGTERM' else 'interrupted'}: wrote {written} image(s) to {out}"
    )
    assert "Traceback" not in err
    for name in os.listdir(out):
        Image.open(out / name).load()  # every PNG there is whole


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--width", "100000"], r"--width 100000: must be a multiple of 8 from 8 to 8192 pixels"),
        (["--height", "16384"], r"--height 16384: must be a multiple of 8 from 8 to 8192 pixels"),
        (
            ["--num_inference_steps", "1001", "--scheduler", "DDIM"],
            r"--num_inference_steps 1001: at most the scheduler's 1000",
        ),
        (["--num_inference_steps", "100000"], r"--num_inference_steps 100000: at most the scheduler's 1000 timesteps"),
        (
            ["--scheduler", "FlowMatchEulerDiscreteScheduler"],
            r"not a sampler for this model; use a webui name \(DDIM, .*\) or one of .*EulerDiscreteScheduler",
        ),
        (["--scheduler", "VQDiffusionScheduler"], r"--scheduler 'VQDiffusionScheduler': not a sampler for this model"),
        (["--scheduler", "Warp drive"], r"--scheduler 'Warp drive': not a sampler for this model"),
    ],
)
def test_sizes_steps_and_samplers_are_checked_before_the_model_loads(
    tiny_model_dir, tmp_path, capsys, monkeypatch, flags, message
):
    import re

    import diffusers

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    code, err = generate(capsys, tiny_model_dir, tmp_path / "o", "--prompt", "a cat", *flags)
    assert code == 2 and "\n" not in err and re.search(message, err), err


@pytest.mark.parametrize(
    "generate_flag, train_flag, value",
    [
        ("--width", "--preview_width", "100"),
        ("--height", "--preview_height", "100000"),
        ("--seed", "--preview_seed", "-3"),
        ("--seed", "--seed", str(2**32)),
        ("--num_inference_steps", "--preview_steps", "0"),
        ("--num_inference_steps", "--preview_steps", "1001"),
        ("--guidance_scale", "--preview_guidance_scale", "inf"),
        ("--batch_size", "--train_batch_size", "0"),
    ],
)
def test_generate_refuses_what_training_refuses_in_the_same_words(
    tiny_model_dir, small_dataset, tmp_path, capsys, monkeypatch, generate_flag, train_flag, value
):
    import diffusers

    from hypernet import training

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    monkeypatch.setattr(training, "load_models", lambda *a, **k: pytest.fail("loaded"))
    code, generate_err = generate(capsys, tiny_model_dir, tmp_path / "g", "--prompt", "a cat", generate_flag, value)
    assert code == 2, generate_err
    train_argv = ["--pretrained_model_name_or_path", tiny_model_dir, "--train_data_dir", small_dataset]
    code = run_script("train_hypernetwork.py", *train_argv, "--output_dir", tmp_path / "t", train_flag, value)
    train_err = capsys.readouterr().err.strip()
    assert code == 2, train_err
    generate_rule = generate_err.split(f"{generate_flag} ", 1)[1].split(": ", 1)[1]
    train_rule = train_err.split(f"{train_flag} ", 1)[1].split(": ", 1)[1]
    assert generate_rule == train_rule and generate_rule.startswith(("must", "at most")), (generate_err, train_err)


def test_every_image_seed_fits_the_seed_rule(tiny_model_dir, tmp_path, capsys):
    code, err = generate(
        capsys, tiny_model_dir, tmp_path / "o", "--prompt", "a cat", "--num_images", "3", "--seed", str(2**32 - 2)
    )
    assert code == 2 and err.endswith(
        "--seed 4294967294: the last image's seed, 4294967296, must be from 0 to 4294967295"
    ), err


def test_help_lists_the_schedulers_the_model_takes(tiny_model_dir, capsys):
    import json
    import re

    import diffusers

    assert run_script("generate.py", "--help") == 0
    help_text = " ".join(capsys.readouterr().out.split())
    listed = re.search(r"for Stable Diffusion's: ([\w, ]+)\. The images'", help_text).group(1).split(", ")
    with open(os.path.join(tiny_model_dir, "scheduler", "scheduler_config.json")) as f:
        config = json.load(f)
    own = getattr(diffusers, config["_class_name"]).from_config(config)
    assert set(listed) == {cls.__name__ for cls in own.compatibles} and "EulerAncestralDiscreteScheduler" in listed


def test_a_compatible_diffusers_scheduler_is_taken(tiny_model_dir, tmp_path, capsys):
    code, err = generate(
        capsys, tiny_model_dir, tmp_path / "o", "--prompt", "a cat", "--scheduler", "EulerDiscreteScheduler"
    )
    assert code == 0, err
    (png,) = [n for n in os.listdir(tmp_path / "o") if n.endswith(".png")]
    assert "Sampler: Euler," in Image.open(tmp_path / "o" / png).info["parameters"]


def test_a_tag_repeated_300_times_holds_one_copy_of_the_file(tmp_path):
    """Memory does not grow with a tag's repeats: the stack holds the one loaded object, not copies."""
    import runpy

    import hypernet

    stacked = runpy.run_module("hypernet.scripts.generate")["stacked"]  # not imported: tests run the script anew
    hn = hypernet.Hypernetwork([8, 16])
    path = str(tmp_path / "a.pt")
    stack = stacked({path: hn}, [(path, 0.5)] * 299 + [(path, 0.8)])
    assert len(stack) == 300 and all(item is hn for item in stack) and hn.multiplier == 0.8


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("<hypernet:a:0.1> " * 33 + "cat", r"33 <hypernet:...> tags, more than 32; stack fewer"),
        ("word " * 30_000, r"150,000 characters, more than 100,000; shorten it"),
    ],
)
def test_prompts_that_ask_for_unbounded_work_are_one_line(tiny_model_dir, tmp_path, capsys, prompt, message):
    (tmp_path / "hn").mkdir()
    import hypernet

    hypernet.save(hypernet.Hypernetwork([96, 40, 80, 160]), str(tmp_path / "hn" / "a.pt"))
    code, err = generate(
        capsys, tiny_model_dir, tmp_path / "o", "--prompt", prompt, "--hypernetwork_dir", tmp_path / "hn"
    )
    assert code == 2 and "\n" not in err and message in err, err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a cat\n\n{prompt}\n", encoding="utf-8")
    code, err = generate(
        capsys, tiny_model_dir, tmp_path / "o", "--prompts_file", prompts, "--hypernetwork_dir", tmp_path / "hn"
    )
    assert code == 2 and err.startswith(f"generate.py: error: --prompts_file {prompts} line 3: prompt "), err


def test_a_prompt_of_more_than_100_chunks_is_one_line_before_any_image(tiny_model_dir, tmp_path, capsys):
    code, err = generate(capsys, tiny_model_dir, tmp_path / "o", "--prompt", "a, " * 4000 + "cat")
    assert code == 2 and "chunks of 75 tokens, more than 100; shorten it" in err.splitlines()[-1], err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n" + "a, " * 4000 + "cat\n", encoding="utf-8")
    code, err = generate(capsys, tiny_model_dir, tmp_path / "o", "--prompts_file", prompts)
    last = err.splitlines()[-1]
    assert code == 2 and last.startswith(f"generate.py: error: --prompts_file {prompts} line 2: prompt 'a, a, "), err
    assert "more than 100; shorten it" in last and not os.listdir(tmp_path / "o")


def test_a_name_up_to_the_file_systems_limit_is_written(tmp_path):
    from hypernet.images import save_png

    path = tmp_path / ("x" * 251 + ".png")  # 255 bytes: the limit of a name on common file systems
    save_png(Image.new("RGB", (8, 8)), path, "a cat")
    assert Image.open(path).info["parameters"] == "a cat" and os.listdir(tmp_path) == [path.name]


@pytest.mark.parametrize("where", ["folder", "device"])
def test_a_folder_or_a_device_given_as_a_prompts_file_is_said_to_be_one(tiny_model_dir, tmp_path, capsys, where):
    path = tmp_path if where == "folder" else "/dev/zero"
    code, err = generate(capsys, tiny_model_dir, tmp_path / "o", "--prompts_file", path)
    expected = (
        "a folder, not a text file"
        if where == "folder"
        else "not a regular file (a device or a pipe?); give a text file"
    )
    assert code == 2 and err == f"generate.py: error: --prompts_file {path}: {expected}", err


def test_names_with_control_characters_cannot_forge_lines_or_escape_sequences(tmp_path, capsys):
    import hypernet

    forged = str(tmp_path / "nope.pt\nconvert.py: ok: all good")
    assert run_script("convert.py", "--info", forged) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.pt\\nconvert.py: ok: all good" in err, err
    coloured = tmp_path / "a\x1b[31mred.pt"
    hypernet.save(hypernet.Hypernetwork([8, 16]), coloured)
    assert run_script("convert.py", "--info", coloured) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "a\\x1b[31mred.pt" in out


def test_a_failed_write_names_the_file_asked_for_not_its_temporary_name(tmp_path, monkeypatch):
    from hypernet.files import atomic_write

    target = tmp_path / "image.png"

    def fail(path):
        raise RuntimeError(f"File {path} cannot be opened for write")

    with pytest.raises(Exception) as caught, atomic_write(target) as tmp:
        fail(tmp)
    assert str(caught.value).startswith(f"{target}: could not write (File {target} cannot be opened for write)")
    assert ".tmp" not in str(caught.value) and os.listdir(tmp_path) == []
