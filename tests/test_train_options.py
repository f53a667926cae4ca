import json
import os
import shutil

import numpy as np
import pytest
import torch
from helpers import a1111_file, run_script, train
from PIL import Image

import hypernet
from hypernet import data, training


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Fail the test if the run gets as far as loading model weights."""

    def refuse(*a, **k):
        raise AssertionError("model weights were loaded before the error was reported")

    monkeypatch.setattr(training, "load_models", refuse)


def run_cli(capsys, argv):
    """(exit code, the one error line without its 'train_hypernetwork.py: error: ' prefix)."""
    capsys.readouterr()
    code = run_script("train_hypernetwork.py", *argv)
    err = capsys.readouterr().err.strip()
    prefix = "train_hypernetwork.py: error: "
    return code, err[len(prefix) :] if err.startswith(prefix) else err


def base_argv(model, data, out):
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out)]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--layer_structure", "2,2,1"], r"--layer_structure \[2, 2, 1\] must start and end with 1"),
        (["--layer_structure", "1,x,1"], r"--layer_structure '1,x,1': expected comma-separated finite numbers"),
        (["--layer_structure", "1,inf,1"], r"--layer_structure '1,inf,1': expected comma-separated finite numbers"),
        (["--layer_structure", "1,0.001,1"], r"--layer_structure \[1, 0.001, 1\]: a layer of width 96 would be empty"),
        (["--layer_structure", "1,1e6,1"], r"--layer_structure \[1, 1000000.0, 1\]: [\d,]+ parameters, more than"),
        (["--activation_func", "wobbly"], r"--activation_func 'wobbly': not an elementwise activation"),
        (
            ["--activation_func", "threshold"],
            r"--activation_func 'threshold': not an elementwise activation hypernet can train; use one of linear, relu",
        ),
        (["--activation_func", "multiheadattention"], r"--activation_func 'multiheadattention': not an elementwise"),
        (["--template_file", "nope.txt"], r"--template_file nope.txt: no such file"),
        (["--clip_skip", "99"], r"--clip_skip 99: use 1 to 2 \(1: the last layer\)"),
        (["--dropout_structure", "0,0.5,0.5"], r"--dropout_structure \[0, 0.5, 0.5\] needs probabilities in \[0, 1\)"),
        (["--learning_rate", "fast"], r"--learning_rate 'fast': expected a number or a schedule"),
        (
            ["--learning_rate", "1e-3:-5, 1e-5"],
            r"the step after ':' must be 1 or more \(or -1, until the end, on the last rate\), not -5",
        ),
        (["--learning_rate", "-0.001"], r"-0.001 is not a finite, non-negative number"),
        (["--optimizer", "Adamish"], r"--optimizer 'Adamish': not a torch.optim class"),
        (["--optimizer", "LBFGS"], r"--optimizer LBFGS: not supported \(it needs a closure\)"),
        (["--optimizer", "SparseAdam"], r"--optimizer SparseAdam: not supported"),
        (["--optimizer", "Optimizer"], r"--optimizer Optimizer: not supported \(the base class\)"),
        (["--lr_scheduler", "garbage"], r"--lr_scheduler 'garbage': use one of constant, "),
        (
            ["--enable_sizes", "768,320,640,1280"],
            r"has widths \[768, 320, 640, 1280\] but this model's attention layers use \[96, 40, 80, 160\].*use --widths auto",
        ),
        (["--enable_sizes", "-40"], r"--widths \[-40\]: widths must be positive"),
        (["--enable_sizes", "40.7"], r"--widths '40.7': expected comma-separated whole numbers"),
        (
            ["--learning_rate", "1e-3:10, 1e-4", "--lr_scheduler", "cosine"],
            r"is an A1111 schedule; use it with --lr_scheduler constant",
        ),
        (["--resolution", "60"], r"--resolution 60: 60 must be a multiple of 8 from 8 to 8192 pixels"),
        (["--preview_width", "65"], r"--preview_width 65: must be a multiple of 8 from 8 to 8192 pixels"),
        (["--seed", "-1"], r"--seed -1: must be from 0 to 4294967295"),
        (["--seed", str(2**40)], r"--seed 1099511627776: must be from 0 to 4294967295"),
        (["--dataloader_num_workers", "-1"], r"--dataloader_num_workers -1: must be 0 or more"),
        (["--save_every", "-2"], r"--save_every -2: must be 0 or more"),
        (["--checkpointing_steps", "-1"], r"--checkpointing_steps -1: must be 0 or more"),
        (["--noise_offset", "nan"], r"--noise_offset nan: must be 0 or more"),
        (["--streaming"], r"--streaming reads a --dataset_name; a --train_data_dir folder is read as it is"),
        (["--adam_beta1", "1.5"], r"--adam_beta1 1.5: must be at least 0 and below 1"),
        (["--preview_guidance_scale", "1e38"], r"--preview_guidance_scale 1e\+38: must be from 0 to 100"),
        (["--preview_prompt", "a (cat:99999)"], r"prompt 'a \(cat:99999\)': 'cat' has the emphasis weight 1e\+05"),
        (["--adam_beta2", "1.0"], r"--adam_beta2 1.0: must be at least 0 and below 1"),
        (["--optimizer", "Muon"], r"--optimizer Muon: cannot train a hypernetwork \(Muon only supports 2D parameters"),
        (["--preview_steps", "5000"], r"--preview_steps 5000: at most the scheduler's 1000 timesteps"),
        (["--preview_width", "100000"], r"--preview_width 100000: must be a multiple of 8 from 8 to 8192 pixels"),
        (["--resolution", "100000"], r"--resolution 100000: 100000 must be a multiple of 8 from 8 to 8192 pixels"),
        (["--resolution", "64,64,64"], r"--resolution '64,64,64': give one size \(512\) or width,height \(768,512\)"),
        (["--center_crop"], r"--center_crop cuts images: add --image_fit crop \(or bucket\)"),
        (
            ["--varsize", "--image_fit", "crop"],
            r"--varsize trains each image at its own size; do not give --image_fit crop",
        ),
        (["--bucket_no_upscale"], r"--bucket_no_upscale is for --image_fit bucket"),
        (
            ["--image_fit", "bucket", "--bucket_reso_steps", "12"],
            r"--bucket_reso_steps 12: must be a positive multiple of 8",
        ),
        (
            ["--image_fit", "bucket", "--min_bucket_reso", "100"],
            r"--min_bucket_reso 100: must be a multiple of --bucket_reso_steps \(64\)",
        ),
        (
            ["--adam_beta1", "0.5", "--optimizer", "SGD"],
            r"--adam_beta1 .*: SGD has no betas setting; leave the flag out",
        ),
        (
            ["--variant", "bogus"],
            r"--variant bogus: .*unet has no file of that variant \(such as diffusion_pytorch_model.bogus.safetensors\); leave --variant out",
        ),
        (["--num_validation_images", "0"], r"--num_preview_images 0: must be at least 1"),
        (
            ["--torch_compile_mode", "max-autotune"],
            r"--torch_compile_mode max-autotune is for --torch_compile; add it",
        ),
        (
            ["--torch_compile", "--torch_compile_mode", "reduce-overhead", "--varsize"],
            r"records CUDA graphs of fixed shapes",
        ),
        (
            ["--hub_model_id", "me/x"],
            r"--hub_model_id, --hub_token and --hub_optimizer_state are for --push_to_hub; add it or leave them out",
        ),
        (
            ["--push_to_hub", "--hub_token", "t", "--report_to", "wandb"],
            r"--hub_token with --report_to wandb would log the token",
        ),
        (["--hypernetwork_name", "training_settings"], r"its card file would be the run's own training_settings.json"),
    ],
)
def test_bad_flags_are_one_line_errors_before_heavy_work(
    tiny_model_dir, small_dataset, tmp_path, capsys, no_heavy_work, extra, message
):
    code, text = run_cli(capsys, base_argv(tiny_model_dir, small_dataset, tmp_path / "o") + extra)
    assert code == 2 and "\n" not in text
    assert __import__("re").search(message, text), text


def test_unusable_model_parts_and_cache_folders_are_one_line_errors_before_heavy_work(
    tiny_model_dir, small_dataset, tmp_path, capsys, no_heavy_work
):
    unet = os.path.join(tiny_model_dir, "unet")
    code, text = run_cli(
        capsys,
        base_argv(tiny_model_dir, small_dataset, tmp_path / "o") + ["--pretrained_vae_model_name_or_path", unet],
    )
    assert code == 2 and text == (
        f"--pretrained_vae_model_name_or_path {unet}: not a VAE folder (its config.json is for "
        "UNet2DConditionModel, not AutoencoderKL)"
    )
    folder = tmp_path / "imagefolder"
    folder.mkdir()
    shutil.copy(os.path.join(small_dataset, sorted(os.listdir(small_dataset))[0]), folder / "a.png")
    (folder / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "text": "x"}\n{"file_name": "gone.png", "text": "y"}\n'
    )
    argv = [
        "--pretrained_model_name_or_path",
        tiny_model_dir,
        "--dataset_name",
        str(folder),
        "--output_dir",
        str(tmp_path / "o"),
    ]
    code, text = run_cli(capsys, argv)
    line = text.splitlines()[-1]  # after the progress bar of datasets' split generation
    assert (
        code == 2
        and line == f"train_hypernetwork.py: error: {folder / 'gone.png'}: cannot be read (No such file or directory)"
    ), text

    import builtins
    import errno

    import hypernet.files

    def read_only(path, *args, **kwargs):
        if ".write-test-" in str(path) and "cache-on-ro" in str(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return builtins.open(path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hypernet.files, "open", read_only, raising=False)
        code, text = run_cli(
            capsys,
            base_argv(tiny_model_dir, small_dataset, tmp_path / "o") + ["--cache_dir", str(tmp_path / "cache-on-ro")],
        )
    assert code == 2 and text == f"--cache_dir {tmp_path / 'cache-on-ro'}: not writable (Read-only file system)", text

    (tmp_path / "a-file").write_text("x")
    code, text = run_cli(
        capsys, base_argv(tiny_model_dir, small_dataset, tmp_path / "o") + ["--cache_dir", str(tmp_path / "a-file")]
    )
    assert code == 2 and text == f"--cache_dir {tmp_path / 'a-file'}: is a file, not a folder", text


def _truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


def _losses_text(path):
    state = json.loads(path.read_text())
    path.write_text(json.dumps(dict(state, losses=["a"])))


@pytest.mark.parametrize(
    "name, damage, message",
    [
        (
            "optimizer.bin",
            _truncate,
            r"optimizer.bin: not a readable PyTorch file .*; resume from an earlier checkpoint",
        ),
        (
            "scheduler.bin",
            lambda p: p.write_bytes(b"garbage"),
            r"scheduler.bin: not a PyTorch file; resume from an earlier",
        ),
        (
            "custom_checkpoint_0.pkl",
            lambda p: p.write_bytes(b"\x80\x04N."),
            r"custom_checkpoint_0.pkl: not a file this script's checkpoints hold",
        ),
        (
            "training_state.json",
            _losses_text,
            r"training_state.json: damaged \(its losses are not all finite numbers\)",
        ),
    ],
)
def test_a_damaged_checkpoint_is_refused_in_one_line_and_the_run_is_left_as_it_was(
    tiny_model_dir, small_dataset, tmp_path, capsys, name, damage, message
):
    out = tmp_path / "run"
    assert train(tiny_model_dir, small_dataset, out, "--checkpointing_steps", 2, steps=2) == 0
    damage(out / "checkpoint-2" / name)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    argv = base_argv(tiny_model_dir, small_dataset, out) + [
        "--resume_from_checkpoint",
        "latest",
        "--resolution",
        "64",
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "2",
    ]
    code, text = run_cli(capsys, argv)
    assert code == 2 and "\n" not in text and __import__("re").search(message, text), text
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_bad_data_is_reported_by_file_before_heavy_work(
    tiny_model_dir, small_dataset, tmp_path, capsys, no_heavy_work
):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, text = run_cli(capsys, base_argv(tiny_model_dir, empty, tmp_path / "o"))
    assert code == 2 and f"--train_data_dir {empty}: no images found" in text

    broken = tmp_path / "broken"
    shutil.copytree(small_dataset, broken)
    (broken / "zz-bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    code, text = run_cli(capsys, base_argv(tiny_model_dir, broken, tmp_path / "o"))
    assert code == 2 and f"{broken / 'zz-bad.png'}: unreadable image" in text

    (broken / "zz-bad.png").write_bytes(b"")
    code, text = run_cli(capsys, base_argv(tiny_model_dir, broken, tmp_path / "o"))
    assert code == 2 and f"{broken / 'zz-bad.png'}: empty file (0 bytes)" in text

    with open(broken / "zz-bad.png", "wb") as f:
        f.truncate(2 << 30)  # sparse: 2 GiB claimed, nothing on disk
    code, text = run_cli(capsys, base_argv(tiny_model_dir, broken, tmp_path / "o"))
    assert code == 2 and text == f"{broken / 'zz-bad.png'}: larger than 1 GiB, too large for a training image"

    code, text = run_cli(capsys, base_argv(tiny_model_dir, small_dataset, tmp_path / "o")[:-2])
    assert code == 2 and text == "the following flags are required: --output_dir"

    other = tmp_path / "sd1.pt"
    hypernet.save(hypernet.Hypernetwork(hypernet.SD1_WIDTHS, name="sd1"), other)
    code, text = run_cli(
        capsys, base_argv(tiny_model_dir, small_dataset, tmp_path / "o") + ["--resume_hypernetwork", str(other)]
    )
    assert code == 2 and "has widths [768, 320, 640, 1280] but this model's attention layers use" in text


UNREADABLE = "/proc/self/mem"  # a regular file whose read fails with EIO


@pytest.mark.skipif(not os.path.exists(UNREADABLE), reason="needs Linux's /proc")
@pytest.mark.parametrize("what", ["image", "caption", "template", "resume"])
def test_a_file_whose_read_fails_is_named_in_one_line(
    tiny_model_dir, small_dataset, tmp_path, capsys, no_heavy_work, what
):
    folder = tmp_path / "data"
    shutil.copytree(small_dataset, folder)
    extra = []
    if what == "image":
        bad = folder / "zz-mem.png"
    elif what == "caption":
        first = sorted(n for n in os.listdir(folder) if n.endswith(".png"))[0]
        bad = folder / (first[:-4] + ".txt")
        bad.unlink(missing_ok=True)
    elif what == "template":
        bad = tmp_path / "template.txt"
        extra = ["--template_file", str(bad)]
    else:
        bad = tmp_path / "mem.pt"
        extra = ["--resume_hypernetwork", str(bad)]
    os.symlink(UNREADABLE, bad)
    code, text = run_cli(capsys, base_argv(tiny_model_dir, folder, tmp_path / "o") + extra)
    assert code == 2 and "\n" not in text, text
    assert f"{bad}: cannot be read (Input/output error)" in text, text


def test_cli_prints_one_line_and_exits_2(tiny_model_dir, tmp_path, capsys):
    assert run_script("train_hypernetwork.py", *base_argv(tiny_model_dir, tmp_path / "none", tmp_path / "o")) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"train_hypernetwork.py: error: --train_data_dir {tmp_path / 'none'}: no such folder"


def test_continue_an_a1111_file_with_its_optimizer_state(tiny_model_dir, small_dataset, tmp_path):
    shutil.copy(a1111_file("case8_with_optim"), tmp_path / "case8.pt")
    shutil.copy(a1111_file("case8_with_optim", ".pt.optim"), tmp_path / "case8.pt.optim")
    out = tmp_path / "more"
    assert (
        train(
            tiny_model_dir,
            small_dataset,
            out,
            "--resume_hypernetwork",
            tmp_path / "case8.pt",
            "--hypernetwork_name",
            "case8b",
            steps=4,
        )
        == 0
    )
    hn_file = hypernet.read(out / "case8b.pt", optimizer_state=True)
    hn = hn_file.hypernetwork
    assert hn.config.step == 4 and hn.widths == [96, 40] and hn.config.activation_func == "relu"
    state = hn_file.optimizer.state_dict["state"]
    assert int(state[0]["step"]) == 4, "3 steps on top of the file's 1: its AdamW state carried on"
    original = torch.load(a1111_file("case8_with_optim"), weights_only=True)
    assert list(torch.load(out / "case8b.pt", weights_only=True)) == list(original)


def _with_amsgrad(state):
    state["param_groups"][0]["amsgrad"] = True
    for values in state["state"].values():
        values["max_exp_avg_sq"] = values["exp_avg_sq"].clone()
    return "its amsgrad is True, this run's AdamW has False"


def _with_sgd_state(state):
    for values in state["state"].values():
        moment = values.pop("exp_avg")
        values.clear()
        values["momentum_buffer"] = moment
    return "the state of parameter 0 holds momentum_buffer; AdamW keeps exp_avg, exp_avg_sq, step"


@pytest.mark.parametrize("damage", [_with_amsgrad, _with_sgd_state])
def test_a_companion_that_does_not_fit_the_runs_optimizer_warns_once_and_training_starts_it_fresh(
    tiny_model_dir, small_dataset, tmp_path, caplog, damage
):
    import logging
    import warnings

    hn_file = hypernet.read(a1111_file("case8_with_optim"), optimizer_state=True)
    hn = hn_file.hypernetwork
    state = hn_file.optimizer.state_dict
    reason = damage(state)
    hypernet.save(hn, tmp_path / "case8.pt", hypernet.OptimizerState("AdamW", state))
    out = tmp_path / "more"
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert (
            train(
                tiny_model_dir,
                small_dataset,
                out,
                "--resume_hypernetwork",
                tmp_path / "case8.pt",
                "--hypernetwork_name",
                "case8b",
                steps=4,
            )
            == 0
        )
    said = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    said = [line for line in said if "optimizer state" in line]
    assert len(said) == 1 and "\n" not in said[0], said
    assert said[0].startswith(f"ignoring optimizer state: {tmp_path / 'case8.pt.optim'}: {reason}; training "), said
    state = hypernet.read(out / "case8b.pt", optimizer_state=True).optimizer.state_dict
    assert int(state["state"][0]["step"]) == 3, "a fresh AdamW state: the 3 steps of this run"
    assert state["param_groups"][0]["amsgrad"] is False


def test_resuming_a_hypernetwork_of_another_family_warns_which_modules_train(
    sd2_model_dir, small_dataset, tmp_path, caplog
):
    import logging
    import warnings

    case1 = a1111_file("case1_default_relu")
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train(sd2_model_dir, small_dataset, tmp_path / "o", "--resume_hypernetwork", case1, steps=1236) == 0
    said = [r.getMessage() for r in caplog.records if "matches no attention layer" in r.getMessage()]
    assert not [w for w in caught if "matches no attention layer" in str(w.message)], "said once, not twice"
    assert said == [
        f"{case1}: its width 96 matches no attention layer of this model (widths [128, 40, 80, 160]), so only its "
        "modules for 40, 80, 160 apply; it was made for another model family"
    ]


def test_v_prediction_snr_noise_offset_checkpointing_bf16(sd2_model_dir, small_dataset, tmp_path):
    out = tmp_path / "sd2"
    assert (
        train(
            sd2_model_dir,
            small_dataset,
            out,
            "--snr_gamma",
            5,
            "--noise_offset",
            0.05,
            "--gradient_checkpointing",
            "--mixed_precision",
            "bf16",
            "--enable_sizes",
            "auto",
            "--add_layer_norm",
            "--activation_func",
            "swish",
            "--weight_init",
            "KaimingNormal",
            "--lr_scheduler",
            "cosine",
            "--lr_warmup_steps",
            2,
            "--allow_tf32",
            steps=5,
        )
        == 0
    )
    hn = hypernet.load(out / "sd2.pt")
    assert hn.widths == [128, 40, 80, 160] and hn.config.add_layer_norm
    assert all(t.dtype == torch.float32 for t in hn.state_dict().values()), "master weights stay float32"
    rows = [line.split(",") for line in open(out / "loss.csv").read().split()[1:]]
    rates = [float(r[4]) for r in rows]
    assert rates[:3] == pytest.approx([0, 5e-4, 1e-3]) and rates[-1] < rates[2], "each step's own rate: warmup 2"
    assert all(float(r[3]) > 0 for r in rows)


def test_8bit_adam_on_cpu_and_a_clear_error_without_bitsandbytes(
    tiny_model_dir, small_dataset, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "bnb"
    assert (
        train(
            tiny_model_dir,
            small_dataset,
            out,
            "--use_8bit_adam",
            "--clip_grad_mode",
            "value",
            "--clip_grad_value",
            "0.05:2, 0.01",
            steps=3,
        )
        == 0
    )
    hn_file = hypernet.read(out / "bnb.pt", optimizer_state=True)
    assert hn_file.optimizer is not None and hn_file.optimizer.name == "AdamW8bit"
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)
    code, text = run_cli(capsys, base_argv(tiny_model_dir, small_dataset, out) + ["--use_8bit_adam"])
    assert code == 2 and text.startswith("--use_8bit_adam needs bitsandbytes: pip install")


def test_imagefolder_dataset_varsize_and_alpha_weights(tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "imagefolder"
    folder.mkdir()
    rows = []
    for i, size in enumerate([(64, 64), (128, 64), (64, 64), (128, 64)]):
        image = Image.new("RGBA", size, (200, 50 * i, 20, 255))
        image.putalpha(Image.linear_gradient("L").resize(size))
        image.save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "caption": f"thing {i}", "text": "unused"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "ds"
    assert (
        train(
            tiny_model_dir,
            None,
            out,
            "--dataset_name",
            folder,
            "--caption_column",
            "caption",
            "--image_column",
            "image",
            "--varsize",
            "--use_weight",
            "--train_batch_size",
            2,
            "--layer_structure",
            "1,1.5,1.5,1",
            "--dropout_structure",
            "0,0.1,0.2,0",
            "--activate_output",
            "--activation_func",
            "elu",
            "--dataloader_num_workers",
            1,
            steps=4,
        )
        == 0
    )
    hn = hypernet.load(out / "ds.pt")
    assert hn.config.dropout_structure == [0, 0.1, 0.2, 0] and hn.config.use_dropout and hn.config.activate_output
    assert [type(m).__name__ for m in hn.pair(96)[0].linear] == [
        "Linear",
        "ELU",
        "Dropout",
        "Linear",
        "ELU",
        "Dropout",
        "Linear",
        "ELU",
    ]
    settings = json.load(open(out / "training_settings.json"))
    assert settings["dataset_size"] == 4 and settings["varsize"] is True

    code, text = run_cli(capsys, ["--pretrained_model_name_or_path", tiny_model_dir, "--output_dir", str(out)])
    assert code == 2 and text == "give exactly one of --train_data_dir and --dataset_name"


def test_alpha_weight_is_normalised_like_a1111():
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    image.paste((0, 0, 0, 255), (0, 0, 32, 64))
    whole = data.Placement((64, 64), (64, 64), 0, 0, (64, 64))
    weight = data.alpha_weight(data.alpha_channel(image), whole, (4, 8, 8))
    assert weight.shape == (4, 8, 8) and weight.min() == 0 and weight.mean().item() == pytest.approx(1.0)
    assert weight[:, :, :3].min() > 1.5 and weight[:, :, 5:].max() == 0
    constant = data.alpha_weight(Image.new("L", (64, 64), 128), whole, (4, 8, 8))
    assert torch.equal(constant, torch.ones(4, 8, 8)), "a constant alpha weighs every pixel alike (the webui: NaN)"
    cut = data.Placement((64, 64), (128, 128), 0, 0, (64, 64))  # the top left quarter of an image scaled twice
    weight = data.alpha_weight(data.alpha_channel(image), cut, (4, 8, 8))
    inside = weight[:, :, :7]
    assert torch.all(inside == inside[0, 0, 0]) and inside.min() > weight[:, :, 7].max(), "the window's alpha"


def test_captions_templates_and_tags():
    assert data.caption_from_name("00012-a red fox.png") == "a red fox"
    line = "a painting of [filewords], art by [name]"
    assert data.make_prompt(line, "fox, red, snow", "inky") == "a painting of fox, red, snow, art by inky"
    rng = __import__("random").Random(0)
    shuffled = data.make_prompt("[filewords]", "a,b,c,d,e,f", "n", rng, shuffle_tags=True)
    assert sorted(shuffled.split(",")) == list("abcdef") and shuffled != "a,b,c,d,e,f"
    dropped = data.make_prompt("[filewords]", ",".join("abcdefghijklmnop"), "n", rng, tag_drop_out=0.5)
    assert 0 < len(dropped.split(",")) < 16
    schedule = training.parse_schedule("5e-5:100, 5e-6:1500, 5e-7", "--learning_rate")
    assert [training.rate_at(schedule, s) for s in (0, 99, 100, 1499, 1500, 99999)] == [
        5e-5,
        5e-5,
        5e-6,
        5e-6,
        5e-7,
        5e-7,
    ]


def test_template_without_filewords_warns_by_name(tmp_path, caplog):
    path = tmp_path / "style.txt"
    path.write_text("a painting, art by [name]\n")
    assert data.load_template(str(path)) == ["a painting, art by [name]"]
    assert f"{path} has no [filewords]" in caplog.text


def test_report_to_all_logs_to_wandb_offline_and_tensorboard(tiny_model_dir, small_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    assert (
        train(
            tiny_model_dir,
            small_dataset,
            out,
            "--report_to",
            "all",
            "--run_name",
            "my-run",
            "--validation_steps",
            2,
            "--validation_prompt",
            "a purple cat",
            "--num_validation_images",
            2,
            "--latent_sampling_method",
            "deterministic",
            steps=2,
        )
        == 0
    )
    first, second = (Image.open(out / "images" / f"wb-2-{i}.png") for i in (0, 1))  # diffusers' flag names
    assert first.info["parameters"].startswith("a purple cat <hypernet:wb:1>\n")
    assert "Seed: 0," in first.info["parameters"] and "Seed: 1," in second.info["parameters"]
    assert not np.array_equal(np.asarray(first), np.asarray(second))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "logs" / "hypernet")), "tensorboard too"
    runs = [d for d in os.listdir(tmp_path / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1
    run_dir = tmp_path / "wandb" / runs[0]
    assert any(name.startswith("validation_2_") for name in os.listdir(run_dir / "files" / "media" / "images"))
    log = next(run_dir.glob("*.wandb")).read_bytes()
    for key in (b"loss", b"lr", b"grad_norm", b"my-run", b"a purple cat"):  # the prompt is the image's caption
        assert key in log, key


def test_push_to_hub_is_refused_in_one_line_without_a_token_the_hub_or_a_network(
    tiny_model_dir, small_dataset, tmp_path, capsys, no_heavy_work, monkeypatch
):
    import huggingface_hub
    from huggingface_hub import constants

    argv = base_argv(tiny_model_dir, small_dataset, tmp_path / "o") + ["--push_to_hub"]
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    code, text = run_cli(capsys, argv)
    assert (
        code == 2
        and text == "--push_to_hub: no Hugging Face token; run `hf auth login`, set HF_TOKEN or pass --hub_token"
    )

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, text = run_cli(capsys, argv + ["--hub_token", "hf_test"])
    assert code == 2 and text.startswith("--push_to_hub: HF_HUB_OFFLINE is set, so nothing can be uploaded")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", "http://127.0.0.1:9")  # nothing listens there
    code, text = run_cli(capsys, argv + ["--hub_token", "hf_test", "--hub_model_id", "me/style"])
    assert code == 2 and "\n" not in text
    assert text.startswith("--push_to_hub: could not create the Hub repository me/style: "), text
    assert not os.path.exists(tmp_path / "o" / "README.md")


@pytest.mark.parametrize(
    "module, flags, message",
    [
        ("wandb", ["--report_to", "wandb"], "--report_to wandb needs wandb: pip install 'hypernet[wandb]'"),
        (
            "tensorboard",
            ["--report_to", "tensorboard"],
            "--report_to tensorboard needs TensorBoard: pip install 'hypernet[tensorboard]'",
        ),
        ("datasets", ["--dataset_name", "{data}"], "needs Hugging Face datasets: pip install 'hypernet[datasets]'"),
    ],
)
def test_a_missing_extra_is_named_in_one_line(
    tiny_model_dir, small_dataset, tmp_path, capsys, monkeypatch, no_heavy_work, module, flags, message
):
    monkeypatch.setitem(__import__("sys").modules, module, None)
    argv = base_argv(tiny_model_dir, small_dataset, tmp_path / "o") + [f.format(data=small_dataset) for f in flags]
    if "--dataset_name" in flags:
        argv.remove("--train_data_dir"), argv.remove(str(small_dataset))
    code, text = run_cli(capsys, argv)
    assert code == 2 and "\n" not in text and message in text, text


@pytest.mark.parametrize(
    "script, flag, message",
    [
        ("train_hypernetwork.py", "--learning_rte", "--learning_rte: no such flag; did you mean --learning_rate"),
        (
            "train_hypernetwork.py",
            "--max_train_step",
            "--max_train_step: no such flag; did you mean --max_train_steps",
        ),
        ("train_hypernetwork.py", "--train_batch", "--train_batch: no such flag; did you mean --train_batch_size"),
        ("generate.py", "--num_image", "--num_image: no such flag; did you mean --num_images"),
        ("convert.py", "--inf", "--inf: no such flag; did you mean --info"),
        ("generate.py", "--zzzz", "--zzzz: no such flag; see --help for the flags"),
    ],
)
def test_a_misspelled_or_shortened_flag_is_one_line_naming_the_nearest(capsys, script, flag, message):
    code = run_script(script, flag, "3")
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"{script}: error: {message}") and "\n" not in err, err


def test_libraries_are_quiet_unless_verbose(tiny_model_dir, small_dataset, tmp_path):
    import subprocess
    import sys

    from helpers import ROOT

    def stderr(out, *flags):
        argv = [
            sys.executable,
            os.path.join(ROOT, "train_hypernetwork.py"),
            *base_argv(tiny_model_dir, small_dataset, out),
        ]
        argv += ["--max_train_steps", "1", "--resolution", "64", "--preview_every", "0", *flags]
        run = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        return run.stderr

    quiet = stderr(tmp_path / "quiet")
    assert "Loading weights" not in quiet and "should be kept in float32" not in quiet and "[RANK 0]" not in quiet
    assert "bitsandbytes" not in quiet
    assert "wrote " in quiet  # hypernet's own lines stay
    loud = stderr(tmp_path / "loud", "--verbose")
    assert "Loading weights" in loud and "[RANK 0] Saving current state" in loud


def test_a_run_ends_naming_every_file_it_wrote_and_the_next_command(tiny_model_dir, small_dataset, tmp_path):
    import shlex
    import subprocess
    import sys

    from helpers import ROOT

    out = tmp_path / "run"
    argv = [
        sys.executable,
        os.path.join(ROOT, "train_hypernetwork.py"),
        *base_argv(tiny_model_dir, small_dataset, out),
    ]
    argv += ["--max_train_steps", "4", "--resolution", "64", "--preview_every", "2", "--save_every", "2"]
    argv += ["--checkpointing_steps", "2", "--save_safetensors", "--cache_dir", tmp_path / "store"]
    run = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = run.stdout.splitlines()
    assert report[0] == "wrote:" and "next:" in report
    files = [line for line in report[1 : report.index("next:")] if not line.startswith("    ")]  # not the figures
    named = [line.strip().split(": ", 1)[0] for line in files]
    assert all(os.path.exists(path) for path in named), named
    written = {os.path.join(out, name) for name in os.listdir(out)} - {os.path.join(out, "checkpoint-2")}
    mentioned = "\n".join(report)
    assert all(path in mentioned for path in written), written - set(named)
    assert str(tmp_path / "store") in named and "images: 3 previews; step 4's: run-4.png" in mentioned
    command = report[report.index("next:") + 1].strip()
    assert command.startswith("python generate.py ") and "<hypernet:run:1> a picture, art by run" in shlex.split(
        command
    )


@pytest.mark.parametrize(
    "script, flag, default",
    [
        ("train_hypernetwork.py", "--learning_rate", "0.00001"),
        ("train_hypernetwork.py", "--max_train_steps", "1000"),
        ("train_hypernetwork.py", "--resolution", "512"),
        ("train_hypernetwork.py", "--seed", "0"),
        ("train_hypernetwork.py", "--save_every", "500"),
        ("train_hypernetwork.py", "--preview_every", "500"),
        ("generate.py", "--num_inference_steps", "20"),
        ("generate.py", "--guidance_scale", "7.0"),
        ("convert.py", "--to", "the other one"),
    ],
)
def test_help_shows_every_default(capsys, script, flag, default):
    assert run_script(script, "--help") == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"  {flag}"))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith("    ") or not lines[i].strip())
    entry = " ".join(" ".join(lines[start:end]).split())
    assert f"(default: {default})" in entry, entry


def test_previews_start_with_the_base_model_and_each_step_has_a_grid(tiny_model_dir, small_dataset, tmp_path):
    from hypernet.images import infotext_prompt

    out = tmp_path / "run"
    flags = ["--preview_every", 2, "--preview_prompt", "a cat", "--preview_prompt", "a dog", "--num_preview_images", 2]
    assert train(tiny_model_dir, small_dataset, out, "--hypernetwork_name", "x", *flags, steps=2) == 0
    names = sorted(os.listdir(out / "images"))
    assert names == [
        "x-2-0-0.png", "x-2-0-1.png", "x-2-1-0.png", "x-2-1-1.png", "x-2-grid.png",
        "x-base-0-0.png", "x-base-0-1.png", "x-base-1-0.png", "x-base-1-1.png", "x-base-grid.png",
    ]  # fmt: skip
    base = Image.open(out / "images" / "x-base-1-1.png")
    assert infotext_prompt(base.info["parameters"]) == ("a dog", []) and "Seed: 1," in base.info["parameters"]
    assert infotext_prompt(Image.open(out / "images" / "x-2-1-1.png").info["parameters"])[1] == [("x", 1.0)]
    grid = Image.open(out / "images" / "x-2-grid.png")
    assert grid.size == (2 * base.width, 2 * base.height)
    assert np.array_equal(
        np.asarray(grid)[base.height :, base.width :], np.asarray(Image.open(out / "images" / "x-2-1-1.png"))
    )


def test_a_run_with_previews_ends_with_its_before_after_grid_whose_figures_match_its_pixels(
    tiny_model_dir, small_dataset, tmp_path, capsys
):
    from hypernet.data import folder_entries
    from hypernet.evaluation import colour_distance, colour_quantiles

    out = tmp_path / "run"
    flags = ["--preview_every", 2, "--preview_prompt", "a cat", "--preview_prompt", "a dog", "--num_preview_images", 2]
    assert train(tiny_model_dir, small_dataset, out, "--hypernetwork_name", "x", *flags, steps=3) == 0
    # 3 is no preview step: the run makes the final weights' previews for the grid
    assert sorted(n for n in os.listdir(out / "images") if n.startswith("x-3")) == [
        "x-3-0-0.png", "x-3-0-1.png", "x-3-1-0.png", "x-3-1-1.png", "x-3-grid.png",
    ]  # fmt: skip
    report = json.loads((out / "x.before-after.json").read_text())
    grid = Image.open(out / "x.before-after.png").convert("RGB")
    entries = folder_entries(small_dataset)
    reference = colour_quantiles([entries.image(i).resize((64, 64), Image.LANCZOS) for i in range(len(entries))])
    shown = set()
    for record in report["images"]:
        step = "base" if record["multiplier"] == 0 else 3
        prompt, seed = ["a cat", "a dog"].index(record["prompt"]), record["seed"]
        source = Image.open(out / "images" / f"x-{step}-{prompt}-{seed}.png").convert("RGB")
        cell = grid.crop(record["box"]).resize(source.size, Image.NEAREST)
        assert np.array_equal(np.asarray(cell), np.asarray(source)), record
        assert record["style"] == pytest.approx(colour_distance(source, reference))
        shown.add((step, prompt, seed))
    assert len(shown) == len(report["images"]) == 8
    at_one = [r["style"] for r in report["images"] if r["multiplier"] == 1]
    assert report["means"] == {
        "not_in_captions": {
            "0": pytest.approx(sum(r["style"] for r in report["images"] if r["multiplier"] == 0) / 4),
            "1": pytest.approx(sum(at_one) / 4),
        }
    }
    printed = capsys.readouterr().out
    assert f"{out / 'x.before-after.png'}: the base model's previews and step 3's side by side" in printed
    assert "prompts not in the captions:" in printed and f"multiplier 1: {sum(at_one) / 4:.1f}" in printed
