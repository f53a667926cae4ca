"""Training runs never lose work: the last good hypernetwork, safe checkpoint rotation, Ctrl-C, full disks, one run
per output folder, and flags that used to pass validation and crash later or train the wrong thing."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch
from helpers import ROOT, a1111_file, read_only_folder, small_disk, train, wait_until_training

import hypernet
from hypernet import formats

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def last_line(capsys):
    """The script's one error line (a progress bar may be closed after it)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if "train_hypernetwork.py: error:" in line]
    assert len(lines) == 1, lines
    return lines[0]


def all_finite(path):
    return all(torch.isfinite(p).all() for p in hypernet.load(path).parameters())


def test_a_diverging_run_keeps_the_last_good_hypernetwork(tiny_model_dir, small_dataset, tmp_path, capsys):
    out = tmp_path / "diverge"
    code = train(
        tiny_model_dir,
        small_dataset,
        out,
        "--hypernetwork_name",
        "x",
        "--learning_rate",
        "1e20",
        "--max_bad_steps",
        2,
        "--save_every",
        1,
        "--weight_init",
        "XavierNormal",
        steps=10,
    )
    assert (
        code == 2
        and "bad steps in a row (non-finite loss or weights); the last good hypernetwork is saved" in last_line(capsys)
    )
    final = hypernet.load(out / "x.pt")
    assert all_finite(out / "x.pt") and max(p.abs().max() for p in final.parameters()) < 10, "not the 1e20 weights"
    for name in os.listdir(out / "hypernetworks"):
        if name.endswith(".pt"):
            assert all_finite(out / "hypernetworks" / name), name


def test_a_step_that_overflows_the_weights_is_undone_at_once(tiny_model_dir, small_dataset, tmp_path, capsys, caplog):
    out = tmp_path / "first"
    code = train(
        tiny_model_dir,
        small_dataset,
        out,
        "--hypernetwork_name",
        "x",
        "--learning_rate",
        "1e39",
        "--max_bad_steps",
        2,
        "--save_every",
        1,
        steps=10,
    )
    assert code == 2 and "stopped at step 2: 2 bad steps in a row" in last_line(capsys)
    assert "step 1: the optimizer step made the weights non-finite" in caplog.text
    initial = hypernet.load(out / "hypernetworks" / "x-1.pt")
    final = hypernet.load(out / "x.pt")
    assert all(torch.equal(a, b) for a, b in zip(initial.parameters(), final.parameters()))
    assert all_finite(out / "x.pt") and final.config.step == 2

    # The rate overflows at step 2 (a save step) and at step 4 (a save step and the last): each is undone, the
    # steps between train on, and the run ends normally with the weights of step 3.
    out = tmp_path / "later"
    code = train(
        tiny_model_dir,
        small_dataset,
        out,
        "--hypernetwork_name",
        "x",
        "--learning_rate",
        "1e-3:1, 1e39:2, 1e-3:3, 1e39",
        "--save_every",
        1,
        "--save_safetensors",
        steps=4,
    )
    assert code == 0
    saved = {step: hypernet.load(out / "hypernetworks" / f"x-{step}.pt") for step in (1, 2, 3, 4)}
    same = [
        all(torch.equal(a, b) for a, b in zip(saved[s].parameters(), saved[s + 1].parameters())) for s in (1, 2, 3)
    ]
    assert same == [True, False, True], "step 2 undone, step 3 trained, step 4 undone"
    for path in (out / "x.pt", out / "safetensors" / "x.safetensors"):
        final = hypernet.load(path)
        assert all(torch.equal(a, b) for a, b in zip(saved[3].parameters(), final.parameters())), path
    optim = hypernet.read(out / "x.pt", optimizer_state=True).optimizer.state_dict
    assert all(torch.isfinite(v).all() for s in optim["state"].values() for v in s.values() if torch.is_tensor(v))


def test_an_optim_with_nan_weight_decay_is_ignored(tiny_model_dir, small_dataset, tmp_path):
    shutil.copy(a1111_file("case8_with_optim"), tmp_path / "c.pt")
    optim = torch.load(a1111_file("case8_with_optim", ".pt.optim"), weights_only=True)
    optim["optimizer_state_dict"]["param_groups"][0]["weight_decay"] = float("nan")
    torch.save(optim, tmp_path / "c.pt.optim")
    with pytest.warns(UserWarning, match="its weight_decay is nan"):
        assert (
            train(
                tiny_model_dir,
                small_dataset,
                tmp_path / "o",
                "--resume_hypernetwork",
                tmp_path / "c.pt",
                "--hypernetwork_name",
                "c2",
                steps=3,
            )
            == 0
        )
    assert all_finite(tmp_path / "o" / "c2.pt")


def test_checkpoint_rotation_removes_old_ones_only_after_the_new_one_is_complete(
    tiny_model_dir, small_dataset, tmp_path, monkeypatch
):
    out = tmp_path / "rot"
    seen = []
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        seen.append((os.path.basename(path), sorted(os.listdir(out))))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    assert (
        train(tiny_model_dir, small_dataset, out, "--checkpointing_steps", 2, "--checkpoints_total_limit", 1, steps=4)
        == 0
    )
    removed = [present for name, present in seen if name == "checkpoint-2" and name in present]
    assert removed and "checkpoint-4" in removed[0], "checkpoint-2 went only once checkpoint-4 was in place"
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint")) == ["checkpoint-4"]


def test_stale_temporary_files_of_a_killed_run_are_removed(tiny_model_dir, small_dataset, tmp_path):
    out = tmp_path / "stale"
    assert (
        train(tiny_model_dir, small_dataset, out, "--hypernetwork_name", "x", "--checkpointing_steps", 2, steps=2) == 0
    )
    (out / "hypernetworks").mkdir(exist_ok=True)
    for path in (out / ".x.pt.0123abcd.tmp", out / "hypernetworks" / ".x-22.pt.deadbeef.tmp"):
        path.write_bytes(b"half")
    (out / "checkpoint-3.partial").mkdir()
    (out / "notes.txt").write_text("mine")
    assert (
        train(
            tiny_model_dir,
            small_dataset,
            out,
            "--hypernetwork_name",
            "x",
            "--checkpointing_steps",
            2,
            "--resume_from_checkpoint",
            "latest",
            steps=3,
        )
        == 0
    )
    leftovers = [f for d, _, fs in os.walk(out) for f in fs if f.endswith(".tmp")]
    assert leftovers == [] and not (out / "checkpoint-3.partial").exists() and (out / "notes.txt").exists()


def test_a_new_run_refuses_a_folder_with_another_runs_checkpoints(tiny_model_dir, small_dataset, tmp_path, capsys):
    out = tmp_path / "shared"
    assert train(tiny_model_dir, small_dataset, out, "--checkpointing_steps", 2, steps=4) == 0
    assert train(tiny_model_dir, small_dataset, out, steps=2) == 2
    assert last_line(capsys).endswith(
        "holds checkpoints of an earlier run (checkpoint-2, checkpoint-4); continue it (resume from its latest "
        "checkpoint), or give the new run another folder"
    )
    other = tmp_path / "other"
    assert train(tiny_model_dir, small_dataset, other, "--checkpointing_steps", 6, steps=6) == 0
    shutil.copytree(other / "checkpoint-6", out / "checkpoint-6")
    assert train(tiny_model_dir, small_dataset, out, "--resume_from_checkpoint", "latest", steps=8) == 2
    assert (
        "holds checkpoints of 2 different runs (checkpoint-2, checkpoint-4, checkpoint-6); name the one"
        in last_line(capsys)
    )


@pytest.mark.parametrize("damage", ["state", "optimizer", "layer_structure"])
def test_a_checkpoint_that_cannot_resume_this_run_is_refused_before_models_load(
    tiny_model_dir, small_dataset, tmp_path, capsys, monkeypatch, damage
):
    out = tmp_path / "ck"
    assert train(tiny_model_dir, small_dataset, out, "--checkpointing_steps", 2, steps=2) == 0
    flags = []
    if damage == "state":
        (out / "checkpoint-2" / "training_state.json").write_text('{"step": ')
    elif damage == "optimizer":
        os.remove(out / "checkpoint-2" / "optimizer.bin")
    else:
        flags = ["--layer_structure", "1,3,1"]
    from hypernet import training

    monkeypatch.setattr(training, "load_models", lambda *a, **k: pytest.fail("models loaded first"))
    assert train(tiny_model_dir, small_dataset, out, "--resume_from_checkpoint", "latest", *flags, steps=4) == 2
    line = last_line(capsys)
    assert {
        "state": "checkpoint-2/training_state.json: damaged (",
        "optimizer": "not a complete checkpoint of this script (missing optimizer.bin)",
        "layer_structure": "was made with other --layer_structure (layer_structure=[1, 2, 1]); give the same flags",
    }[damage] in line, line


def test_resume_hypernetwork_refuses_conflicting_settings_and_a_fractional_step(
    tiny_model_dir, small_dataset, tmp_path, capsys
):
    assert (
        train(
            tiny_model_dir,
            small_dataset,
            tmp_path / "o",
            "--resume_hypernetwork",
            a1111_file("case1_default_relu"),
            "--layer_structure",
            "1,3,1",
            "--activation_func",
            "elu",
            steps=2,
        )
        == 2
    )
    assert last_line(capsys).endswith(
        "--resume_hypernetwork keeps the file's own settings; do not give --activation_func, --layer_structure"
    )
    data = torch.load(a1111_file("case1_default_relu"), weights_only=True)
    torch.save(dict(data, step=2.5), tmp_path / "frac.pt")
    assert train(tiny_model_dir, small_dataset, tmp_path / "o", "--resume_hypernetwork", tmp_path / "frac.pt") == 2
    assert last_line(capsys).endswith("frac.pt: step is 2.5, not a whole number")


def test_output_folder_checks(tiny_model_dir, small_dataset, tmp_path, capsys, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    assert train(tiny_model_dir, small_dataset, tmp_path / "a-file") == 2
    assert last_line(capsys).endswith("a-file: is a file, not a folder")
    assert train(tiny_model_dir, small_dataset, small_dataset) == 2
    assert last_line(capsys).endswith("is the --train_data_dir; write the run elsewhere")
    (tmp_path / "named").mkdir()
    monkeypatch.chdir(tmp_path / "named")
    assert train(tiny_model_dir, small_dataset, ".", steps=1) == 0
    assert (tmp_path / "named" / "named.pt").exists() and not (tmp_path / "named" / "..pt").exists()


def test_a_read_only_output_folder_or_a_latin1_template_is_one_line(tiny_model_dir, small_dataset, tmp_path, capsys):
    with read_only_folder(tmp_path / "ro") as ready:
        if not ready:
            pytest.skip("no read-only folder can be made here")
        assert train(tiny_model_dir, small_dataset, tmp_path / "ro" / "run") == 2
        assert "not writable" in last_line(capsys)
    (tmp_path / "latin.txt").write_bytes("une peinture de [filewords], caf\xe9".encode("latin-1"))
    assert train(tiny_model_dir, small_dataset, tmp_path / "o", "--template_file", tmp_path / "latin.txt") == 2
    assert last_line(capsys).endswith("latin.txt: not UTF-8 or UTF-16 text; re-save it as UTF-8")


def test_wandb_without_a_login_is_refused_before_models_load(
    tiny_model_dir, small_dataset, tmp_path, capsys, monkeypatch
):
    for variable in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    assert train(tiny_model_dir, small_dataset, tmp_path / "o", "--report_to", "wandb") == 2
    assert "no W&B login; run `wandb login`, set WANDB_API_KEY, or WANDB_MODE=offline" in last_line(capsys)


def test_every_file_pil_opens_trains_as_in_the_webui(tiny_model_dir, small_dataset, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(small_dataset, data)
    from PIL import Image

    Image.new("RGB", (64, 64)).save(data / "anim.gif")
    Image.new("RGB", (64, 64)).save(data / "scan.tiff")
    (data / "notes.md").write_text("not an image\n")
    assert train(tiny_model_dir, data, tmp_path / "o", steps=1) == 0
    settings = json.loads((tmp_path / "o" / "training_settings.json").read_text())
    assert settings["dataset_size"] == len(os.listdir(small_dataset)) // 2 + 2, (
        "the .gif and .tiff train; notes.md not"
    )
    assert "skipped" not in caplog.text


# writes that fail ---------------------------------------------------------------------------------------------


def fill(path, keep):
    """Fill a tmpfs but for about `keep` bytes."""
    with open(path / "ballast", "wb") as f:
        while shutil.disk_usage(path).free > keep + 4096:
            try:
                f.write(b"\0" * min(1 << 16, shutil.disk_usage(path).free - keep))
                f.flush()
            except OSError:
                break


def test_a_full_disk_keeps_each_pt_and_optim_pair_consistent(tmp_path, monkeypatch):
    hn_file = hypernet.read(a1111_file("case8_with_optim"), optimizer_state=True)
    hn = hn_file.hypernetwork
    with small_disk(tmp_path / "disk", size="4m") as mounted:
        target = tmp_path / "disk" / "x.pt"
        hypernet.save(hn, target, hn_file.optimizer)
        before = (target.read_bytes(), (tmp_path / "disk" / "x.pt.optim").read_bytes())
        hn.config.step += 1
        if mounted:
            fill(tmp_path / "disk", keep=len(before[0]) + 4096)  # room for the .pt, not for its .optim
        else:
            real = formats.torch_save_for_webui

            def full_for_optim(obj, tmp, path):
                if path.endswith(".optim"):
                    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4544 vs 4438")
                return real(obj, tmp, path)

            monkeypatch.setattr(formats, "torch_save_for_webui", full_for_optim)
        with pytest.raises(hypernet.HypernetError, match=r"could not write \(no space left on the device: [\d.]+ MiB"):
            hypernet.save(hn, target, hn_file.optimizer)
        after = (target.read_bytes(), (tmp_path / "disk" / "x.pt.optim").read_bytes())
        assert after == before, "neither file replaced"
        assert [n for n in os.listdir(tmp_path / "disk") if n.endswith(".tmp")] == []


def test_a_full_disk_during_training_is_one_line_and_keeps_the_last_files(
    tiny_model_dir, small_dataset, tmp_path, capsys, monkeypatch
):
    with small_disk(tmp_path / "disk", size="3m") as mounted:
        out = tmp_path / "disk" / "run"
        if not mounted:
            from safetensors import SafetensorError

            real = formats.save_safetensors_file

            def full(*args, **kwargs):
                raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

            monkeypatch.setattr(formats, "save_safetensors_file", full)
        code = train(
            tiny_model_dir,
            small_dataset,
            out,
            "--hypernetwork_name",
            "x",
            "--save_every",
            1,
            "--checkpointing_steps",
            1,
            "--save_safetensors",
            steps=200,
        )
        if not mounted:
            monkeypatch.setattr(formats, "save_safetensors_file", real)
        line = last_line(capsys)
        assert code == 2 and "could not write" in line and "no space left on the device" in line, line
        snapshots = sorted(os.listdir(out / "hypernetworks"))
        for name in (n for n in snapshots if n.endswith(".pt")):
            path = out / "hypernetworks" / name
            if os.path.exists(f"{path}.optim"):
                assert hypernet.read(path, optimizer_state=True).optimizer is not None, "a matching pair"


# processes ----------------------------------------------------------------------------------------------------


def command(model, data, out, steps, *extra):
    return [
        sys.executable,
        os.path.join(ROOT, "train_hypernetwork.py"),
        "--pretrained_model_name_or_path",
        model,
        "--train_data_dir",
        data,
        "--output_dir",
        str(out),
        "--hypernetwork_name",
        "x",
        "--resolution",
        "64",
        "--max_train_steps",
        str(steps),
        "--preview_every",
        "0",
        "--save_every",
        "0",
        "--checkpointing_steps",
        "0",
        *map(str, extra),
    ]


@pytest.mark.slow
def test_ctrl_c_saves_and_a_second_one_quits_at_once(tiny_model_dir, small_dataset, tmp_path):
    out = tmp_path / "interrupted"
    process = subprocess.Popen(
        command(tiny_model_dir, small_dataset, out, 100000), env=ENV, stderr=subprocess.PIPE, text=True
    )
    wait_until_training(process)
    time.sleep(1)
    process.send_signal(signal.SIGINT)
    rest = process.communicate(timeout=60)[1]
    assert process.returncode == 0, rest[-3000:]
    step = hypernet.load(out / "x.pt").config.step
    assert step > 0 and os.path.isdir(out / f"checkpoint-{step}")
    assert f"stopped by SIGINT at step {step}; continue with --resume_from_checkpoint latest" in rest
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest

    process = subprocess.Popen(
        command(tiny_model_dir, small_dataset, tmp_path / "twice", 100000), env=ENV, stderr=subprocess.PIPE, text=True
    )
    wait_until_training(process)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    # The second Ctrl-C goes as soon as the run says it is stopping: still within its step or its save, however
    # fast this machine finishes them.
    while "press Ctrl-C again" not in process.stderr.readline():
        assert process.poll() is None, "the run ended before it acknowledged the first Ctrl-C"
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=30)
    assert process.returncode != 0


@pytest.mark.slow
def test_one_run_per_output_folder_and_a_killed_run_leaves_no_lock(tiny_model_dir, small_dataset, tmp_path):
    out = tmp_path / "busy"
    first = subprocess.Popen(
        command(tiny_model_dir, small_dataset, out, 100000, "--checkpointing_steps", 2),
        env=ENV,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until_training(first)
    second = subprocess.run(command(tiny_model_dir, small_dataset, out, 4), env=ENV, capture_output=True, text=True)
    assert second.returncode == 2
    assert f"another run is writing to it (pid {first.pid}); give each run its own folder" in second.stderr
    while not any(d.startswith("checkpoint-") and not d.endswith(".partial") for d in os.listdir(out)):
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    resumed = subprocess.run(
        command(tiny_model_dir, small_dataset, out, 4, "--resume_from_checkpoint", "latest"),
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]


def test_every_checkpoint_of_a_run_carries_its_run_id(tiny_model_dir, small_dataset, tmp_path):
    import json

    out = tmp_path / "ids"
    assert train(tiny_model_dir, small_dataset, out, "--checkpointing_steps", 2, steps=2) == 0
    assert (
        train(
            tiny_model_dir,
            small_dataset,
            out,
            "--checkpointing_steps",
            2,
            "--resume_from_checkpoint",
            "latest",
            steps=4,
        )
        == 0
    )
    ids = {json.load(open(out / f"checkpoint-{s}" / "training_state.json"))["run_id"] for s in (2, 4)}
    assert len(ids) == 1 and uuid.UUID(ids.pop())


def test_disk_errors_name_the_free_space():
    assert hypernet.files.write_failure(OSError(errno.ENOSPC, "No space left on device"), "/tmp/x").startswith(
        "no space left on the device: "
    )
    assert hypernet.files.write_failure(RuntimeError("a bug"), "/tmp/x") is None, "other errors are not disguised"
