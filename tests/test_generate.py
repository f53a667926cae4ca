import hashlib
import os
import shutil

import numpy as np
import pytest
from helpers import CIVITAI_NETWORK, a1111_file, infotext_hashes, run_script
from PIL import Image

import hypernet
from hypernet.prompts import parse_prompt


@pytest.fixture(scope="module")
def hn_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hypernetworks")
    shutil.copy(a1111_file("case1_default_relu"), directory / "case1.pt")
    hypernet.save(hypernet.load(a1111_file("case3_layernorm_swish")), directory / "swish.safetensors")
    return directory


def gen(model, out, *flags):
    """generate.py as a user runs it; the images it wrote, in order."""
    before = set(os.listdir(out)) if os.path.isdir(out) else set()
    argv = [
        "--pretrained_model_name_or_path",
        model,
        "--output_dir",
        out,
        "--num_inference_steps",
        "4",
        "--no_progress",
    ]
    assert run_script("generate.py", *argv, *flags) == 0
    return sorted(os.path.join(out, n) for n in set(os.listdir(out)) - before if not n.startswith("grid-"))


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_multiplier_zero_is_the_plain_pipeline_and_the_image_follows_the_multiplier(tiny_model_dir, hn_dir, tmp_path):
    case1 = a1111_file("case1_default_relu")
    plain = pixels(gen(tiny_model_dir, tmp_path / "plain", "--prompt", "a cat")[0])
    images = {
        m: pixels(gen(tiny_model_dir, tmp_path / f"m{m}", "--prompt", "a cat", "--hypernetwork", f"{case1}:{m}")[0])
        for m in (0, 0.5, 1)
    }
    assert np.array_equal(images[0], plain)
    assert np.abs(images[1] - plain).mean() > 1 and np.abs(images[0.5] - plain).mean() > 0.3
    assert not np.array_equal(images[0.5], images[1])
    tagged = gen(
        tiny_model_dir, tmp_path / "tag", "--prompt", "<hypernet:case1:1> a cat", "--hypernetwork_dir", hn_dir
    )
    assert np.array_equal(pixels(tagged[0]), images[1]), "prompt syntax = flag at the same multiplier"
    info = Image.open(tagged[0]).info["parameters"]
    assert info.startswith("a cat <hypernet:case1:1>\nSteps: 4, ")
    assert CIVITAI_NETWORK.findall(info.split("\n")[0]) == [("hypernet", "case1", "1")]
    assert infotext_hashes(info) == {
        "model": hypernet.hashing.base_model_hash(tiny_model_dir),
        "hypernet:case1": hashlib.sha256((hn_dir / "case1.pt").read_bytes()).hexdigest()[:10],
    }


def test_stacking_order_and_both_syntaxes(tiny_model_dir, hn_dir, tmp_path):
    case1 = a1111_file("case1_default_relu")
    both = gen(
        tiny_model_dir,
        tmp_path / "a",
        "--prompt",
        "a dog <hypernet:swish:0.7>",
        "--hypernetwork_dir",
        hn_dir,
        "--hypernetwork",
        f"{case1}:0.5",
    )[0]
    swapped = gen(
        tiny_model_dir,
        tmp_path / "b",
        "--prompt",
        "a dog <hypernet:case1:0.5>",
        "--hypernetwork_dir",
        hn_dir,
        "--hypernetwork",
        f"{hn_dir / 'swish.safetensors'}:0.7",
    )[0]
    assert not np.array_equal(pixels(both), pixels(swapped)), "order matters, as in A1111"
    info = Image.open(both).info["parameters"]
    assert info.startswith("a dog <hypernet:case1_default_relu:0.5> <hypernet:swish:0.7>\n")
    assert sorted(infotext_hashes(info)) == ["hypernet:case1_default_relu", "hypernet:swish", "model"]
    assert infotext_hashes(info)["hypernet:swish"] == hypernet.shorthash(hn_dir / "swish.safetensors")


def test_a_repeated_tag_applies_the_file_again_at_its_last_multiplier_as_the_webui(tiny_model_dir, hn_dir, tmp_path):
    """The webui's load_hypernetworks keeps one object a loaded file: a repeated tag applies it again, and every
    occurrence has the multiplier set last. The same as two distinct copies of the file, each at that multiplier."""
    shutil.copy(hn_dir / "case1.pt", tmp_path / "case1-copy.pt")
    repeated = gen(
        tiny_model_dir,
        tmp_path / "a",
        "--prompt",
        "a dog <hypernet:case1:0.3> <hypernet:case1:0.8>",
        "--hypernetwork_dir",
        hn_dir,
    )[0]
    copies = gen(
        tiny_model_dir,
        tmp_path / "b",
        "--prompt",
        "a dog",
        "--hypernetwork",
        f"{hn_dir / 'case1.pt'}:0.8",
        "--hypernetwork",
        f"{tmp_path / 'case1-copy.pt'}:0.8",
    )[0]
    once = gen(tiny_model_dir, tmp_path / "c", "--prompt", "a dog <hypernet:case1:0.8>", "--hypernetwork_dir", hn_dir)
    assert np.array_equal(pixels(repeated), pixels(copies))
    assert not np.array_equal(pixels(repeated), pixels(once[0])), "applied twice"
    info = Image.open(repeated).info["parameters"]
    assert info.startswith("a dog <hypernet:case1:0.3> <hypernet:case1:0.8>\n")


def test_text_mlp_runs_once_per_step_and_linear_ones_are_merged(tiny_model_dir, hn_dir, tmp_path, monkeypatch):
    calls = {}
    real = hypernet.load

    def spy(path, *args, **kwargs):
        hn = real(path, *args, **kwargs)
        hn.pair(96)[0].register_forward_hook(lambda *a, path=str(path): calls.setdefault(path, []).append(1))
        return hn

    monkeypatch.setattr(hypernet, "load", spy)
    hypernet.save(hypernet.Hypernetwork([96, 40, 80, 160]), tmp_path / "linear.pt")
    for hypernetwork in (a1111_file("case1_default_relu"), str(tmp_path / "linear.pt")):
        gen(
            tiny_model_dir,
            tmp_path / "o",
            "--prompt",
            "one",
            "--prompt",
            "two",
            "--hypernetwork",
            hypernetwork,
            "--num_inference_steps",
            6,
        )
    # relu: once per UNet forward (6 steps x 2 prompts), not in each of the 7 cross-attention layers
    assert len(calls[a1111_file("case1_default_relu")]) == 12
    assert str(tmp_path / "linear.pt") not in calls, "a linear hypernetwork is merged into to_k/to_v"


def test_options_seed_batch_size_negative_scheduler_prompts_file(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    written = gen(
        tiny_model_dir,
        tmp_path / "o",
        "--prompts_file",
        prompts,
        "--num_images",
        3,
        "--batch_size",
        2,
        "--seed",
        10,
        "--negative_prompt",
        "blurry",
        "--guidance_scale",
        5.5,
        "--width",
        64,
        "--height",
        96,
        "--scheduler",
        "DPM++ 2M Karras",
        "--dtype",
        "fp32",
        "--device",
        "cpu",
    )
    assert [os.path.basename(p) for p in written] == [f"{i:05d}-{10 + i}.png" for i in range(6)]
    assert Image.open(written[0]).size == (64, 96)
    info = Image.open(written[4]).info["parameters"]
    model_hash = hypernet.hashing.base_model_hash(tiny_model_dir)
    assert info == (
        "a blue square\nNegative prompt: blurry\nSteps: 4, Sampler: DPM++ 2M Karras, CFG scale: 5.5, Seed: 14, "
        f"Size: 64x96, Model hash: {model_hash}, Model: {os.path.basename(tiny_model_dir)}, "
        f'Hashes: {{"model": "{model_hash}"}}'
    )
    grid = Image.open(tmp_path / "o" / "grid-00000.png")
    assert grid.size == (3 * 64, 2 * 96)
    single = gen(
        tiny_model_dir,
        tmp_path / "s",
        "--prompt",
        "a red circle",
        "--seed",
        11,
        "--negative_prompt",
        "blurry",
        "--guidance_scale",
        5.5,
        "--width",
        64,
        "--height",
        96,
        "--scheduler",
        "DPMSolverMultistepScheduler",
    )[0]
    assert "Sampler: DPM++ 2M," in Image.open(single).info["parameters"]
    assert not [n for n in os.listdir(tmp_path / "s") if n.startswith("grid-")]


@pytest.mark.parametrize("model_fixture", ["sd2_model_dir", "sdxl_model_dir"])
def test_sd2_v_prediction_and_sdxl_pipelines(model_fixture, tmp_path, request):
    model = request.getfixturevalue(model_fixture)
    case1 = a1111_file("case1_default_relu")
    plain = pixels(gen(model, tmp_path / "p", "--prompt", "x", "--num_inference_steps", 3)[0])
    with_hn = pixels(
        gen(model, tmp_path / "h", "--prompt", "x", "--num_inference_steps", 3, "--hypernetwork", case1)[0]
    )
    zero = pixels(
        gen(model, tmp_path / "z", "--prompt", "x", "--num_inference_steps", 3, "--hypernetwork", f"{case1}:0")[0]
    )
    assert np.array_equal(zero, plain) and not np.array_equal(with_hn, plain)


def test_a_hypernetwork_for_another_family_gets_one_warning_line(sd2_model_dir, tmp_path, capsys):
    case1 = a1111_file("case1_default_relu")
    capsys.readouterr()
    gen(sd2_model_dir, tmp_path / "w", "--prompt", "x", "--num_inference_steps", 2, "--hypernetwork", case1)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "matches no attention layer" in line]
    assert warnings == [
        f"warning: {case1}: its width 96 matches no attention layer of this model (widths [40, 80, 128, 160]), so "
        "only its modules for 40, 80, 160 apply; it was made for another model family"
    ]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--hypernetwork", "nope.pt"], r"--hypernetwork 'nope.pt': no such file"),
        (["--hypernetwork", "{case1}:strong"], r"the multiplier after ':' must be a number, as in FILE:0.8"),
        (
            ["--prompt", "<hypernet:ghost:0.5> a cat"],
            r"prompt tag <hypernet:ghost:0.5>: no hypernetwork 'ghost' in .* \(it has: ",
        ),
        (
            ["--hypernetwork", "{sd1}"],
            r"sd1.pt has widths \[768, 320, 640, 1280\] but this model's attention layers use \[96, 40, 80, 160\]",
        ),
        (["--scheduler", "Warp drive"], r"--scheduler 'Warp drive': not a sampler for this model"),
        (["--torch_compile_mode", "reduce-overhead"], r"--torch_compile_mode reduce-overhead is for --torch_compile"),
        (["--from_single_file"], r"no such checkpoint file"),
        (
            ["--from_single_file", "--pretrained_model_name_or_path", "{case1}", "--config", "nowhere"],
            r"--config nowhere: no such folder \(give a diffusers folder of the model's family\)",
        ),
    ],
)
def test_bad_input_is_a_clear_error_before_the_pipeline_loads(
    tiny_model_dir, tmp_path, monkeypatch, capsys, flags, message
):
    sd1 = tmp_path / "sd1.pt"
    hypernet.save(hypernet.Hypernetwork(hypernet.SD1_WIDTHS), sd1)
    import diffusers

    def refuse(*a, **k):
        pytest.fail("the pipeline was loaded")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", refuse)
    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_single_file", refuse)
    flags = [f.format(case1=a1111_file("case1_default_relu"), sd1=sd1) for f in flags]
    argv = (
        [
            "--pretrained_model_name_or_path",
            tiny_model_dir,
            "--output_dir",
            str(tmp_path / "o"),
            "--hypernetwork_dir",
            str(tmp_path),
        ]
        + (["--prompt", "a cat"] if "--prompt" not in flags else [])
        + flags
    )
    assert run_script("generate.py", *argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("generate.py: error: ") and "\n" not in err
    assert __import__("re").search(message, err), err


def test_single_file_without_configs_says_what_to_pass(tiny_pipeline, tmp_path, monkeypatch, capsys):
    from ldm_checkpoint import write_ldm_checkpoint

    from hypernet import models

    monkeypatch.setitem(models.DEFAULT_CONFIGS, "sd1", "hypernet-tests/never-cached")
    monkeypatch.setenv("HYPERNET_CACHE_DIR", str(tmp_path / "cache"))
    empty, checkpoint = tmp_path / "empty.safetensors", tmp_path / "model.safetensors"
    empty.write_bytes(b"")
    write_ldm_checkpoint(tiny_pipeline, str(checkpoint))
    for path, message in [
        (empty, "not a checkpoint hypernet can read"),
        (
            checkpoint,
            "pass --config a diffusers folder of an SD 1.x model, or --original_config the checkpoint's .yaml",
        ),
    ]:
        argv = ["--pretrained_model_name_or_path", path, "--prompt", "x", "--output_dir", tmp_path / "o"]
        assert run_script("generate.py", *argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, err


def test_prompt_tags_are_parsed_as_the_webui_parses_them(tmp_path):
    (tmp_path / "a.pt").write_bytes(b"x")
    (tmp_path / "b.safetensors").write_bytes(b"x")
    assert parse_prompt("<hypernet:a:0.3> a cat, <hypernet:a> <hypernet:b:-1>", str(tmp_path)) == (
        "a cat",
        [(str(tmp_path / "a.pt"), 0.3), (str(tmp_path / "a.pt"), 1.0), (str(tmp_path / "b.safetensors"), -1.0)],
    )


def test_from_single_file_with_a_local_config_matches_the_folder(tiny_model_dir, tiny_pipeline, tmp_path):
    from ldm_checkpoint import write_ldm_checkpoint

    checkpoint = tmp_path / "tiny.safetensors"
    write_ldm_checkpoint(tiny_pipeline, checkpoint)
    case1 = f"{a1111_file('case1_default_relu')}:0.8"
    folder = gen(tiny_model_dir, tmp_path / "folder", "--prompt", "a cat", "--hypernetwork", case1)[0]
    single = gen(
        checkpoint,
        tmp_path / "single",
        "--from_single_file",
        "--config",
        tiny_model_dir,
        "--prompt",
        "a cat",
        "--hypernetwork",
        case1,
    )[0]
    assert np.array_equal(pixels(single), pixels(folder))
    info = Image.open(single).info["parameters"]
    assert f"Model hash: {hypernet.shorthash(checkpoint)}, Model: tiny," in info


def test_a_long_prompt_with_emphasis_and_clip_skip_2(tiny_model_dir, tmp_path):
    long = "a teal star, (bold outline:1.3), " + "stripes, " * 20 + "BREAK orange"
    first = gen(tiny_model_dir, tmp_path / "a", "--prompt", long, "--negative_prompt", "blurry", "--clip_skip", "2")
    info = Image.open(first[0]).info["parameters"]
    assert info.startswith(long + "\nNegative prompt: blurry\nSteps: 4, ") and ", Clip skip: 2" in info
    plain = gen(tiny_model_dir, tmp_path / "b", "--prompt", long, "--negative_prompt", "blurry")
    assert "Clip skip" not in Image.open(plain[0]).info["parameters"], "the webui writes it only above 1"
    assert not np.array_equal(pixels(first[0]), pixels(plain[0]))
    cut = gen(tiny_model_dir, tmp_path / "c", "--prompt", long[:60], "--negative_prompt", "blurry")
    assert not np.array_equal(pixels(cut[0]), pixels(plain[0])), "the tokens past 75 count"


@pytest.mark.parametrize("name", [n for n in __import__("hypernet.images").images.SAMPLERS if n != "PNDM"])
def test_webui_sampler_names_round_trip_through_infotext(tiny_model_dir, name):
    """--sampler NAME makes the scheduler diffusers maps it to, and the infotext names that scheduler NAME again, so
    that the webui's PNG Info restores it."""
    import json

    from hypernet.images import make_scheduler, sampler_name

    with open(os.path.join(tiny_model_dir, "scheduler", "scheduler_config.json")) as f:
        config = json.load(f)
    try:
        scheduler = make_scheduler(name, config)
    except hypernet.ArgumentError as e:  # LMS needs scipy, which the tests' environment lacks
        assert name.startswith("LMS") and str(e).startswith(
            f"sampler {name!r}: LMSDiscreteScheduler requires the scipy"
        )
        return
    assert sampler_name(scheduler) == name


def test_a_png_names_the_webui_sampler_it_was_made_with(tiny_model_dir, tmp_path):
    from helpers import run_script

    for flags, name in (
        ([], "DDIM"),
        (["--sampler", "Euler a"], "Euler a"),
        (["--scheduler", "UniPCMultistepScheduler"], "UniPC"),
    ):
        out = tmp_path / name
        argv = ["--pretrained_model_name_or_path", tiny_model_dir, "--output_dir", out, "--prompt", "a cat"]
        assert run_script("generate.py", *argv, "--num_inference_steps", 2, "--no_progress", *flags) == 0
        (png,) = [n for n in os.listdir(out) if n.endswith(".png")]
        assert f"Sampler: {name}, " in Image.open(out / png).info["parameters"]
