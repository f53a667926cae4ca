"""Managing a training run's folder: one run at a time (a lock), what a killed run left removed, the run's id,
which checkpoint to resume and whether it is whole, the last good weights to go back to after a bad step, and the
loss log (loss.csv) with its chart."""

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import math
import os
import re
import shutil
import uuid

import torch
from PIL import Image, ImageDraw

from .errors import ArgumentError, HypernetError, UsageError
from .files import atomic_write
from .images import save_png
from .memory import same_layout
from .untrusted import torch_load_safely

CHECKPOINT_FILES = ("hypernetwork.safetensors", "training_state.json", "optimizer.bin", "scheduler.bin")
RANDOM_STATES = re.compile(r"random_states_\d+\.pkl")  # accelerate's, one per process
TEMPORARY_FILE = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")  # hypernet.files.atomic_writes' names
PARTIAL_CHECKPOINT = re.compile(r"checkpoint-\d+\.partial")


def new_run_id():
    """The id every checkpoint of one run carries, resumed or not."""
    return uuid.uuid4().hex


def list_checkpoints(output_dir):
    """The checkpoint-STEP folders in `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", d)]
    return sorted(names, key=lambda d: int(d.split("-")[1]))


def count(value):
    """A whole number, 0 or more (JSON's true is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_training_state(checkpoint):
    """A checkpoint's training_state.json, checked: its step, losses, bad-step count, run id and the processes and
    batch it was trained with."""
    path = os.path.join(checkpoint, "training_state.json")
    try:
        with open(path) as f:
            saved = json.load(f)
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
        if not (count(saved["step"]) and count(saved["bad_steps"]) and isinstance(saved["losses"], list)):
            raise ValueError("its step and bad_steps must be whole numbers, 0 or more, and its losses a list")
        if not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in saved["losses"]
        ):
            raise ValueError("its losses are not all finite numbers")
        if not isinstance(saved.get("run_id"), (str, type(None))):
            raise ValueError("its run_id is not text")
        batch = saved.get("batch", {})
        if not (isinstance(batch, dict) and all(k in BATCH_KEYS and count(v) and v for k, v in batch.items())):
            raise ValueError(f"its batch must hold positive whole numbers for {', '.join(BATCH_KEYS)}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{path}: damaged ({e}); resume from an earlier checkpoint or start anew") from None
    return saved


BATCH_KEYS = ("processes", "train_batch_size", "gradient_accumulation_steps")


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def state_digest(saved):
    """The sha256 of a training_state.json's content but its digest: an edit to the file shows."""
    content = {key: value for key, value in saved.items() if key != "digest"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def seal_checkpoint(path):
    """Complete a written checkpoint's training_state.json with every other file's sha256 and a digest of its own
    content, so that a damaged or edited checkpoint is found before anything trains on it."""
    state_path = os.path.join(path, "training_state.json")
    with open(state_path) as f:
        saved = json.load(f)
    names = sorted(name for name in os.listdir(path) if name != "training_state.json")
    saved["files"] = {name: sha256_of(os.path.join(path, name)) for name in names}
    saved["digest"] = state_digest(saved)
    with atomic_write(state_path) as tmp, open(tmp, "w") as f:
        json.dump(saved, f, indent=2)


def check_seal(path, saved):
    """The checkpoint's files are the ones its training_state.json lists, as they were written, and the state itself
    is as written (UsageErrors naming the file)."""
    again = "resume from an earlier checkpoint or start anew"
    state_path = os.path.join(path, "training_state.json")
    if not isinstance(saved.get("files"), dict) or saved.get("digest") != state_digest(saved):
        raise UsageError(f"{state_path}: edited or damaged (its digest does not match its content); {again}")
    present = sorted(name for name in os.listdir(path) if name != "training_state.json")
    for name in sorted(set(present) | set(saved["files"])):
        file = os.path.join(path, name)
        if name not in saved["files"]:
            raise UsageError(f"{file}: not a file this checkpoint was written with; remove it or {again}")
        if name not in present:
            raise UsageError(f"{file}: missing (the checkpoint was written with it); {again}")
        if sha256_of(file) != saved["files"][name]:
            raise UsageError(f"{file}: damaged or edited (not the bytes the checkpoint was written with); {again}")


def check_checkpoint_files(path):
    """Every file of a checkpoint is one a run writes, and its optimizer and scheduler states read safely as state
    dicts, before accelerate's load_state sees them."""
    for name in sorted(os.listdir(path)):
        if name not in CHECKPOINT_FILES and not RANDOM_STATES.fullmatch(name):
            raise UsageError(
                f"{os.path.join(path, name)}: not a file this script's checkpoints hold (it may come from another "
                "script); resume from a checkpoint of train_hypernetwork.py"
            )
    for name, keys in (("optimizer.bin", ("state", "param_groups")), ("scheduler.bin", ())):
        file = os.path.join(path, name)
        try:
            state = torch_load_safely(file)
        except HypernetError as e:
            raise UsageError(f"{e}; resume from an earlier checkpoint or start anew") from None
        if not isinstance(state, dict) or any(key not in state for key in keys):
            raise UsageError(f"{file}: damaged (not a state dict); resume from an earlier checkpoint or start anew")


def checkpoint_to_resume(output_dir, checkpoint):
    """The checkpoint folder to resume: `checkpoint` is "latest" (the newest in `output_dir`, None where it has
    none), a folder, or a folder's name in `output_dir`. Checked whole: its files are all there and read safely,
    and "latest" refuses a folder that holds checkpoints of several runs (ArgumentErrors about `checkpoint`; a
    damaged file is a UsageError naming it)."""
    if checkpoint == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            return None
        runs = {read_training_state(os.path.join(output_dir, name)).get("run_id") for name in found}
        if len(runs) > 1:
            raise ArgumentError(
                "checkpoint",
                f"latest: {output_dir} holds checkpoints of {len(runs)} different runs ({', '.join(found)}); name the "
                "one to continue, as checkpoint-STEP",
            )
        path = os.path.join(output_dir, found[-1])
    else:
        path = checkpoint
        if not os.path.isdir(path) and os.path.isdir(os.path.join(output_dir, path)):
            path = os.path.join(output_dir, path)
    missing = [name for name in CHECKPOINT_FILES if not os.path.isfile(os.path.join(path, name))]
    if missing:
        raise ArgumentError(
            "checkpoint", f"{path}: not a complete checkpoint of this script (missing {', '.join(missing)})"
        )
    saved = read_training_state(path)
    check_checkpoint_files(path)
    named = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(os.path.normpath(path)))
    if named and int(named.group(1)) != saved["step"]:
        raise UsageError(
            f"{os.path.join(path, 'training_state.json')}: step {saved['step']}, but the folder is {named.group(0)} "
            "(edited?); resume from an earlier checkpoint or start anew"
        )
    check_seal(path, saved)
    return path


class RunLock:
    """One run per output folder: an exclusive lock on OUTPUT/.hypernet.lock that ends with the process that holds
    it, so a crash leaves none behind."""

    def __init__(self, output_dir):
        self.file = open(os.path.join(output_dir, ".hypernet.lock"), "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            owner = self.file.read().strip()
            self.file.close()
            raise ArgumentError(
                "output_dir",
                f"{output_dir}: another run is writing to it ({owner or 'pid unknown'}); give each run its own folder",
            ) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()}")
        self.file.flush()

    def close(self):
        """End the lock and remove its file (still holding it, so that no other run holds a removed file)."""
        with contextlib.suppress(OSError):
            os.remove(self.file.name)
        self.file.close()


def remove_leftovers(output_dir, folders=("hypernetworks", "images")):
    """What a killed run left unfinished: temporary files beside the files it was replacing, and checkpoints it was
    still writing (checkpoint-STEP.partial)."""
    for folder in (output_dir, *(os.path.join(output_dir, d) for d in folders)):
        for name in os.listdir(folder) if os.path.isdir(folder) else ():
            if TEMPORARY_FILE.fullmatch(name):
                os.remove(os.path.join(folder, name))
    for name in os.listdir(output_dir):
        if PARTIAL_CHECKPOINT.fullmatch(name):
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def claim_output_dir(output_dir, resuming):
    """Lock `output_dir` for this run (a RunLock), remove what a killed run left, and refuse to mix a new run into
    an earlier run's checkpoints (ArgumentErrors about `output_dir`)."""
    lock = RunLock(output_dir)
    try:
        remove_leftovers(output_dir)
        earlier = list_checkpoints(output_dir)
        if earlier and not resuming:
            raise ArgumentError(
                "output_dir",
                f"{output_dir} holds checkpoints of an earlier run ({', '.join(earlier)}); continue it (resume from "
                "its latest checkpoint), or give the new run another folder",
            )
    except BaseException:
        lock.close()
        raise
    return lock


class LastGood:
    """The weights and optimizer state as they were before the last optimizer step, to go back to when a step's
    loss, weights or optimizer state turn out not finite: the weights saved as the last good ones always gave a
    finite loss.

    Its copies live in buffers allocated once, on the parameters' devices: the weights' at construction, the
    optimizer state's at the first keep() after the optimizer made its state (AdamW: two moments and a step per
    weight). Memory: one more copy of the weights and of the optimizer's tensor state (3x the hypernetwork's weights
    for AdamW); each step copies those bytes in place and allocates nothing.
    """

    def __init__(self, parameters, optimizer):
        self.parameters, self.optimizer = list(parameters), optimizer
        self.weights = [p.detach().clone() for p in self.parameters]
        self.state = {}  # parameter -> {key: a tensor buffer, or a value that is not a tensor}
        self.kept = False
        self.restored = False  # whether the weights now are the restored ones

    @torch.no_grad()
    def keep(self):
        for saved, p in zip(self.weights, self.parameters):
            saved.copy_(p)
        for p, values in self.optimizer.state.items():
            saved = self.state.setdefault(p, {})
            for key, value in values.items():
                if not torch.is_tensor(value):
                    saved[key] = value
                elif key in saved and same_layout(saved[key], value):
                    saved[key].copy_(value)
                else:  # the first keep after the optimizer made this state
                    saved[key] = value.detach().clone()
        self.kept = True

    @torch.no_grad()
    def finite(self):
        """Whether the weights and the optimizer's floating-point state are all finite (one device sync)."""
        tensors = list(self.parameters) + [
            v
            for values in self.optimizer.state.values()
            for v in values.values()
            if torch.is_tensor(v) and v.is_floating_point()
        ]
        return bool(torch.stack([torch.isfinite(t).all().to(self.parameters[0].device) for t in tensors]).all())

    @torch.no_grad()
    def restore(self):
        for saved, p in zip(self.weights, self.parameters):
            p.copy_(saved)
        if not self.kept:
            return
        for p, values in self.state.items():
            for key, value in values.items():
                current = self.optimizer.state[p].get(key)
                if torch.is_tensor(current) and torch.is_tensor(value) and same_layout(current, value):
                    current.copy_(value)
                else:
                    self.optimizer.state[p][key] = value.clone() if torch.is_tensor(value) else value

    def nbytes(self):
        """Bytes its buffers hold."""
        tensors = self.weights + [v for values in self.state.values() for v in values.values() if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in tensors)


# -- the loss log and its chart ---------------------------------------------------------------------------

LOSS_COLUMNS = ("step", "epoch", "epoch_step", "loss", "learn_rate")


def write_loss_csv(path, rows):
    """loss.csv of a run: a row a step (step, epoch, epoch_step, loss, learn_rate), written whole or not at all."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(LOSS_COLUMNS)
    writer.writerows(rows)
    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        f.write(buffer.getvalue())


def read_loss_csv(path, up_to_step):
    """The rows of loss.csv up to a step (where a resumed run continues), as strings; none where it is missing."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    return [row for row in rows if row and row[0].isdigit() and int(row[0]) <= up_to_step]


def plot_loss(rows, path, title):
    """A plain loss-per-step chart as PNG (no plotting library needed)."""
    width, height, margin = 640, 360, 48
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    points = [(int(r[0]), float(r[3])) for r in rows if math.isfinite(float(r[3]))]
    draw.text((margin, 12), title, fill="black")
    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    if len(points) >= 2:
        steps, losses = zip(*points)
        lo, hi = min(losses), max(losses)
        hi = hi if hi > lo else lo + 1e-8

        def xy(step, loss):
            x = margin + (step - steps[0]) / max(1, steps[-1] - steps[0]) * (width - 2 * margin)
            return x, height - margin - (loss - lo) / (hi - lo) * (height - 2 * margin)

        draw.line([xy(s, v) for s, v in points], fill=(200, 200, 255), width=1)
        window = max(1, len(points) // 20)
        smooth = [
            (points[i][0], sum(v for _, v in points[max(0, i - window + 1) : i + 1]) / min(window, i + 1))
            for i in range(len(points))
        ]
        draw.line([xy(s, v) for s, v in smooth], fill=(20, 60, 200), width=2)
        draw.text((4, margin - 6), f"{hi:.4f}", fill="black")
        draw.text((4, height - margin - 6), f"{lo:.4f}", fill="black")
        draw.text((margin, height - margin + 6), f"step {steps[0]}", fill="black")
        draw.text((width - margin - 60, height - margin + 6), f"step {steps[-1]}", fill="black")
    save_png(image, path)
