"""Crash safety, preemption and exact resume: a run killed or stopped at any moment loses nothing."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, train, wait_until_training
from test_train import assert_same_weights, read_csv

import hypernet
from hypernet import training

pytestmark = pytest.mark.slow

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


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
        "--learning_rate",
        "1e-3",
        "--max_train_steps",
        str(steps),
        "--preview_every",
        "0",
        "--random_flip",
        "--use_dropout",
        "--layer_structure",
        "1,2,2,1",
        *map(str, extra),
    ]


def wait_for(predicate, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert process.poll() is None, process.stderr.read()[-3000:]
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_sigkill_during_a_checkpoint_save_leaves_the_last_good_files(tiny_model_dir, small_dataset, tmp_path):
    out = tmp_path / "killed"
    paused = [sys.executable, os.path.join(ROOT, "tests", "slow_save.py"), "6", "60"]
    run = command(tiny_model_dir, small_dataset, out, 9, "--checkpointing_steps", 3, "--save_every", 3)
    process = subprocess.Popen(paused + run[2:], env=ENV, stderr=subprocess.PIPE, text=True)
    wait_for(
        lambda: os.path.isdir(out / "checkpoint-6.partial") and os.path.exists(out / "hypernetworks" / "x-6.pt"),
        process,
    )
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint")) == ["checkpoint-3", "checkpoint-6.partial"]
    assert hypernet.load(out / "checkpoint-3" / "hypernetwork.safetensors").config.step == 3
    for step in (3, 6):
        saved_file = hypernet.read(out / "hypernetworks" / f"x-{step}.pt", optimizer_state=True)
        saved = saved_file.hypernetwork
        assert saved.config.step == step and saved_file.optimizer is not None
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")], "no half-written file left in place"

    resumed = subprocess.run(
        command(
            tiny_model_dir, small_dataset, out, 9, "--checkpointing_steps", 3, "--resume_from_checkpoint", "latest"
        ),
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "checkpoint-3 at step 3" in resumed.stderr
    assert not os.path.exists(out / "checkpoint-6.partial")
    straight = subprocess.run(
        command(tiny_model_dir, small_dataset, tmp_path / "straight", 9), env=ENV, capture_output=True, text=True
    )
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert_same_weights(out / "x.pt", tmp_path / "straight" / "x.pt")


def test_sigterm_saves_and_exits_0_then_resumes_bitwise(tiny_model_dir, small_dataset, tmp_path):
    out = tmp_path / "preempted"
    process = subprocess.Popen(
        command(tiny_model_dir, small_dataset, out, 100000, "--checkpointing_steps", 0),
        env=ENV,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until_training(process)
    time.sleep(2)
    started = time.time()
    process.send_signal(signal.SIGTERM)
    rest = process.communicate(timeout=60)[1]
    assert process.returncode == 0, rest[-3000:]
    assert time.time() - started < 30
    stopped_at = hypernet.load(out / "x.pt").config.step
    assert 0 < stopped_at < 100000
    assert os.path.isdir(out / f"checkpoint-{stopped_at}")
    assert f"stopped by SIGTERM at step {stopped_at}; continue with --resume_from_checkpoint latest" in rest
    assert [int(r["step"]) for r in read_csv(out / "loss.csv")] == list(range(1, stopped_at + 1))

    target = stopped_at + 3
    resumed = subprocess.run(
        command(tiny_model_dir, small_dataset, out, target, "--resume_from_checkpoint", "latest"),
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = subprocess.run(
        command(tiny_model_dir, small_dataset, tmp_path / "straight", target), env=ENV, capture_output=True, text=True
    )
    assert straight.returncode == 0
    assert_same_weights(out / "x.pt", tmp_path / "straight" / "x.pt")


def test_two_process_resume_equals_uninterrupted_two_process_run(tiny_model_dir, small_dataset, tmp_path):
    def launch(out, steps, port, *extra):
        run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
        run += command(tiny_model_dir, small_dataset, out, steps, "--checkpointing_steps", 2, *extra)[1:]
        result = subprocess.run(
            run, env=dict(ENV, ACCELERATE_USE_CPU="1"), capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stderr

    launch(tmp_path / "full", 6, 29621)
    launch(tmp_path / "half", 3, 29622)
    log = launch(tmp_path / "half", 6, 29623, "--resume_from_checkpoint", "latest")
    assert "checkpoint-3 at step 3" in log and "identical on all 2 processes" in log
    assert_same_weights(tmp_path / "full" / "x.pt", tmp_path / "half" / "x.pt")


def nan_loss_at(monkeypatch, steps):
    """diffusion_loss returns NaN at these optimizer steps (1-based), as an overflowing model would."""
    real, calls = training.diffusion_loss, []

    def loss(*args, **kwargs):
        calls.append(1)
        value = real(*args, **kwargs)
        return value * float("nan") if len(calls) in steps else value

    monkeypatch.setattr(training, "diffusion_loss", loss)


def test_nan_loss_is_skipped_and_reported(tiny_model_dir, small_dataset, tmp_path, monkeypatch, caplog):
    nan_loss_at(monkeypatch, {3})
    out = tmp_path / "nan"
    assert train(tiny_model_dir, small_dataset, out, "--hypernetwork_name", "x", steps=5) == 0
    assert "step 3: non-finite loss (nan); step skipped, back to the last good weights" in caplog.text
    rows = read_csv(out / "loss.csv")
    assert rows[2]["loss"] == "nan" and all(r["loss"] != "nan" for r in rows[:2] + rows[3:])
    hn = hypernet.load(out / "x.pt")
    assert hn.config.step == 5 and all(torch.isfinite(p).all() for p in hn.parameters())


def test_too_many_bad_steps_stop_with_the_last_good_hypernetwork(
    tiny_model_dir, small_dataset, tmp_path, monkeypatch, capsys
):
    nan_loss_at(monkeypatch, {3, 4, 5, 6})
    out = tmp_path / "bad"
    code = train(
        tiny_model_dir,
        small_dataset,
        out,
        "--hypernetwork_name",
        "x",
        "--max_bad_steps",
        2,
        "--save_every",
        1,
        steps=10,
    )
    assert code == 2
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .startswith(
            "train_hypernetwork.py: error: stopped at step 4: 2 bad steps in a row (non-finite loss or weights); the last good hypernetwork"
        )
    )
    # The weights after step 2 gave the non-finite loss of step 3: the last good ones are those after step 1.
    last_good, final = hypernet.load(out / "hypernetworks" / "x-1.pt"), hypernet.load(out / "x.pt")
    assert final.config.step == 4
    snapshot = hypernet.load(out / "hypernetworks" / "x-3.pt")
    for a, b, c in zip(last_good.parameters(), final.parameters(), snapshot.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c), "every file after the bad step holds the last good weights"
