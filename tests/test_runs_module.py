"""hypernet.runs: the lock, leftovers, checkpoint choice, the last good weights and the loss log, without a training
run."""

import json
import os
import subprocess
import sys

import pytest
import torch

import hypernet
from hypernet import runs


def checkpoint(folder, step, run_id="a", files=runs.CHECKPOINT_FILES):
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name in files:
        if name == "training_state.json":
            (path / name).write_text(json.dumps({"step": step, "losses": [0.1], "bad_steps": 0, "run_id": run_id}))
        elif name.endswith(".bin"):
            torch.save({"state": {}, "param_groups": []}, path / name)
        else:
            hypernet.save(hypernet.Hypernetwork([8]), path / name)
    if "training_state.json" in files:
        runs.seal_checkpoint(path)
    return path


def test_latest_is_the_newest_checkpoint_of_the_one_run(tmp_path):
    checkpoint(tmp_path, 2), checkpoint(tmp_path, 10), checkpoint(tmp_path, 4)
    assert runs.list_checkpoints(tmp_path) == ["checkpoint-2", "checkpoint-4", "checkpoint-10"]
    assert runs.checkpoint_to_resume(tmp_path, "latest") == os.path.join(tmp_path, "checkpoint-10")
    assert runs.checkpoint_to_resume(tmp_path, "checkpoint-4") == os.path.join(tmp_path, "checkpoint-4")
    assert runs.checkpoint_to_resume(tmp_path / "empty", "latest") is None
    checkpoint(tmp_path, 12, run_id="b")
    with pytest.raises(
        hypernet.errors.ArgumentError, match=r"^checkpoint latest: .* holds checkpoints of 2 different runs"
    ) as e:
        runs.checkpoint_to_resume(tmp_path, "latest")
    assert e.value.argument == "checkpoint"
    assert str(e.value.about("--resume_from_checkpoint")).startswith("--resume_from_checkpoint latest: ")


def test_an_incomplete_or_damaged_checkpoint_is_refused_by_name(tmp_path):
    checkpoint(tmp_path, 2, files=runs.CHECKPOINT_FILES[:2])
    with pytest.raises(
        hypernet.errors.ArgumentError, match=r"checkpoint-2: not a complete checkpoint .*optimizer.bin"
    ):
        runs.checkpoint_to_resume(tmp_path, "checkpoint-2")
    path = checkpoint(tmp_path, 4)
    (path / "training_state.json").write_text('{"step": 4, "losses": [NaN], "bad_steps": 0}')
    with pytest.raises(hypernet.UsageError, match=r"training_state.json: damaged \(its losses are not all finite"):
        runs.checkpoint_to_resume(tmp_path, "checkpoint-4")
    path = checkpoint(tmp_path, 6)
    (path / "model.safetensors").write_bytes(b"")
    with pytest.raises(hypernet.UsageError, match=r"model.safetensors: not a file this script's checkpoints hold"):
        runs.checkpoint_to_resume(tmp_path, "checkpoint-6")


def edit_state(path, **changes):
    state = json.loads((path / "training_state.json").read_text())
    state.update(changes)
    (path / "training_state.json").write_text(json.dumps(state))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"step": 1000000000}, r"training_state.json: step 1000000000, but the folder is checkpoint-4 \(edited\?\)"),
        ({"step": True}, r"training_state.json: damaged \(its step and bad_steps must be whole numbers, 0 or more"),
        ({"step": -4}, r"training_state.json: damaged \(its step and bad_steps must be whole numbers, 0 or more"),
        ({"bad_steps": 1.5}, r"damaged \(its step and bad_steps must be whole numbers"),
        ({"run_id": "another"}, r"training_state.json: edited or damaged \(its digest does not match its content\)"),
        ({"batch": {"processes": 0}}, r"damaged \(its batch must hold positive whole numbers for processes"),
        ({"files": {}}, r"training_state.json: edited or damaged"),
    ],
)
def test_an_edited_training_state_is_refused_before_anything_trains_on_it(tmp_path, changes, message):
    path = checkpoint(tmp_path, 4)
    edit_state(path, **changes)
    with pytest.raises(hypernet.UsageError, match=message):
        runs.checkpoint_to_resume(tmp_path, "latest")


def test_a_checkpoint_file_changed_added_or_removed_after_it_was_written_is_refused(tmp_path):
    path = checkpoint(tmp_path, 4)
    runs.checkpoint_to_resume(tmp_path, "latest")  # whole
    hypernet.save(hypernet.Hypernetwork([8, 16]), path / "hypernetwork.safetensors")
    with pytest.raises(hypernet.UsageError, match=r"hypernetwork.safetensors: damaged or edited \(not the bytes"):
        runs.checkpoint_to_resume(tmp_path, "latest")
    path = checkpoint(tmp_path / "b", 4)
    torch.save({}, path / "random_states_1.pkl")
    with pytest.raises(hypernet.UsageError, match=r"random_states_1.pkl: not a file this checkpoint was written with"):
        runs.checkpoint_to_resume(tmp_path / "b", "latest")
    path = checkpoint(tmp_path / "c", 4)
    torch.save({}, path / "random_states_0.pkl")
    runs.seal_checkpoint(path)
    (path / "random_states_0.pkl").unlink()
    with pytest.raises(
        hypernet.UsageError, match=r"random_states_0.pkl: missing \(the checkpoint was written with it\)"
    ):
        runs.checkpoint_to_resume(tmp_path / "c", "latest")


def test_one_run_per_folder_and_leftovers_removed(tmp_path):
    (tmp_path / "hypernetworks").mkdir()
    leftovers = [tmp_path / ".x.pt.0123abcd.tmp", tmp_path / "hypernetworks" / ".x-5.pt.89abcdef.tmp"]
    for path in leftovers:
        path.write_bytes(b"half")
    (tmp_path / "checkpoint-8.partial").mkdir()
    kept = tmp_path / "notes.tmp"
    kept.write_text("mine")
    lock = runs.claim_output_dir(tmp_path, resuming=False)
    assert not any(path.exists() for path in leftovers) and not (tmp_path / "checkpoint-8.partial").exists()
    assert kept.exists()
    code = f"from hypernet import runs; runs.claim_output_dir({str(tmp_path)!r}, resuming=False)"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert f"another run is writing to it (pid {os.getpid()}); give each run its own folder" in other.stderr
    lock.close()
    assert not (tmp_path / ".hypernet.lock").exists()
    subprocess.run([sys.executable, "-c", code], check=True)  # the lock ended with its holder
    checkpoint(tmp_path, 2)
    with pytest.raises(hypernet.errors.ArgumentError, match=r"holds checkpoints of an earlier run \(checkpoint-2\)"):
        runs.claim_output_dir(tmp_path, resuming=False)
    runs.claim_output_dir(tmp_path, resuming=True).close()


def test_last_good_restores_weights_and_adamw_state_from_buffers_allocated_once():
    hn = hypernet.Hypernetwork([8, 4], activation_func="relu", weight_init="XavierNormal").train()
    parameters = list(hn.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=0.1)
    last_good = runs.LastGood(parameters, optimizer)
    weights_bytes = sum(p.numel() * p.element_size() for p in parameters)
    assert last_good.nbytes() == weights_bytes

    def step():
        for p in parameters:
            p.grad = torch.randn_like(p)
        optimizer.step()

    last_good.keep()
    step()  # the optimizer makes its state
    last_good.keep()
    buffers = [id(t) for values in last_good.state.values() for t in values.values() if torch.is_tensor(t)]
    for _ in range(3):
        last_good.keep()
        kept = [p.detach().clone() for p in parameters], [optimizer.state[p]["exp_avg"].clone() for p in parameters]
        step()
    assert [id(t) for values in last_good.state.values() for t in values.values() if torch.is_tensor(t)] == buffers
    # AdamW: exp_avg, exp_avg_sq and step per weight, beside the weights themselves
    steps = [optimizer.state[p]["step"] for p in parameters]
    assert last_good.nbytes() == 3 * weights_bytes + sum(s.numel() * s.element_size() for s in steps)
    parameters[0].data[0, 0] = float("nan")
    assert not last_good.finite()
    last_good.restore()  # to the state before the last of the four steps
    assert last_good.finite()
    assert all(torch.equal(w, p) for w, p in zip(kept[0], parameters))
    assert all(torch.equal(m, optimizer.state[p]["exp_avg"]) for m, p in zip(kept[1], parameters))
    assert [optimizer.state[p]["step"].item() for p in parameters] == [3.0] * len(parameters)


def test_the_loss_log_is_read_back_up_to_the_step_a_resumed_run_continues_from(tmp_path):
    path = tmp_path / "loss.csv"
    assert runs.read_loss_csv(path, 10) == [], "no log yet"
    rows = [[step, 0, step, f"{1 / step:.7f}", 0.005] for step in range(1, 7)]
    runs.write_loss_csv(path, rows)
    assert path.read_text().splitlines()[0] == "step,epoch,epoch_step,loss,learn_rate"
    kept = runs.read_loss_csv(path, 4)
    assert [row[0] for row in kept] == ["1", "2", "3", "4"] and kept[1][3] == "0.5000000"


def test_the_loss_chart_draws_the_losses_and_their_running_mean(tmp_path):
    from PIL import Image

    rows = [[step, 0, step, str(2.0 / step), 0.005] for step in range(1, 41)] + [[41, 0, 41, "nan", 0.005]]
    runs.plot_loss(rows, tmp_path / "loss.png", "style: loss per step")
    chart = Image.open(tmp_path / "loss.png").convert("RGB")
    colours = {colour for _, colour in chart.getcolors(maxcolors=1 << 16)}
    assert chart.size == (640, 360)
    assert (200, 200, 255) in colours and (20, 60, 200) in colours, "the losses and their running mean"
    runs.plot_loss(rows[:1], tmp_path / "one.png", "one step")
    one = Image.open(tmp_path / "one.png").convert("RGB")
    assert (20, 60, 200) not in {c for _, c in one.getcolors(maxcolors=1 << 16)}, "no line through a single point"
