"""Two nodes simulated on one machine (two `torchrun --nnodes 2` launchers on loopback, each with its own HOME and
TMPDIR, gloo): every stop, kill, silent peer and error ends every process with one line, and every resume equals
the uninterrupted run; the SLURM example, under stub srun and scontrol, forwards the signal, requeues and resumes."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from helpers import ROOT, small_disk
from test_train import assert_same_weights

import hypernet
from hypernet import runs

pytestmark = pytest.mark.slow

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", ACCELERATE_USE_CPU="1")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def training_flags(model, data, out, steps, *extra):
    flags = ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--output_dir", out]
    flags += ["--hypernetwork_name", "x", "--resolution", "64", "--learning_rate", "1e-3", "--max_train_steps", steps]
    flags += ["--preview_every", "0", "--save_every", "0", "--checkpointing_steps", "0", "--use_dropout"]
    flags += ["--layer_structure", "1,2,2,1", "--random_flip"]
    return [str(f) for f in [*flags, *extra]]


class Node:
    """One node's launcher: `torchrun --nnodes 2 --node_rank RANK`, one process, its own HOME and TMPDIR; its
    output in node{RANK}.log."""

    def __init__(self, tmp_path, rank, port, flags, cwd=None):
        self.home = home = tmp_path / f"node{rank}"
        (home / "tmp").mkdir(parents=True, exist_ok=True)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
        launcher += ["--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port)]
        env = dict(ENV, HOME=str(home), TMPDIR=str(home / "tmp"))
        self.log = tmp_path / f"node{rank}.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [*launcher, os.path.join(ROOT, "train_hypernetwork.py"), *flags],
                env=env,
                cwd=cwd or home,
                stderr=log,
                stdout=subprocess.DEVNULL,
            )

    def output(self):
        return self.log.read_text()

    def finish(self, timeout=300):
        """(exit code, output); None where the launcher had not ended within `timeout` (it is killed then)."""
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        self.signal(signal.SIGKILL)  # what is left of it
        self.process.wait()
        return code, self.output()

    def wait_for(self, text, timeout=120):
        deadline = time.time() + timeout
        while text not in self.output():
            assert time.time() < deadline, self.output()[-3000:]
            time.sleep(0.2)

    def signal(self, signum):
        """Signal the node's launcher and its trainer (which torchrun starts in a session of its own)."""
        signal_processes(f"HOME={self.home}", signum)


def signal_processes(variable, signum):
    """Signal every process whose environment holds `variable` ("NAME=value"): the processes a test started."""
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if variable.encode() in f.read().split(b"\0"):
                    os.kill(pid, signum)
        except OSError:
            pass


def two_nodes(tmp_path, flags, cwds=(None, None)):
    port = free_port()
    return [Node(tmp_path, rank, port, flags, cwd) for rank, cwd in enumerate(cwds)]


def our_lines(err):
    """The trainers' own error lines (from where each begins: another process's progress bar may precede it)."""
    marker = "train_hypernetwork.py: error: "
    return [line[line.index(marker) :] for line in err.splitlines() if marker in line]


def wait_for_checkpoint(out, node, timeout=180):
    deadline = time.time() + timeout
    while not (out.is_dir() and any(re.fullmatch(r"checkpoint-\d+", name) for name in os.listdir(out))):
        assert node.process.poll() is None and time.time() < deadline, node.output()[-3000:]
        time.sleep(0.2)


def test_two_nodes_end_equal_to_one_node_with_two_processes(tiny_model_dir, small_dataset, tmp_path):
    cache = tmp_path / "cache"
    flags = training_flags(tiny_model_dir, small_dataset, tmp_path / "nodes", 6, "--cache_dir", cache)
    for node in two_nodes(tmp_path, flags):
        code, err = node.finish()
        assert code == 0, err[-3000:]
    one_node = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port()]
    flags = training_flags(tiny_model_dir, small_dataset, tmp_path / "one", 6, "--cache_dir", cache)
    run = subprocess.run(
        [str(a) for a in one_node] + [os.path.join(ROOT, "train_hypernetwork.py"), *flags],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_weights(tmp_path / "nodes" / "x.pt", tmp_path / "one" / "x.pt")


def test_sigterm_to_one_nodes_launcher_stops_both_with_a_checkpoint_and_the_resume_equals_the_whole_run(
    tiny_model_dir, small_dataset, tmp_path
):
    cache, out = tmp_path / "cache", tmp_path / "stopped"
    flags = training_flags(tiny_model_dir, small_dataset, out, 100000, "--cache_dir", cache)
    nodes = two_nodes(tmp_path, [*flags, "--checkpointing_steps", "2"])
    wait_for_checkpoint(out, nodes[0])
    nodes[1].process.send_signal(signal.SIGTERM)  # the launcher's: torchrun passes it on to its trainer
    # Node 0's trainer ends at once; its torchrun then waits at its exit barrier for node 1's, which the signal ended.
    nodes[0].wait_for("continue with --resume_from_checkpoint latest")
    err0, err1 = nodes[0].finish(30)[1], nodes[1].finish(30)[1]
    stopped = hypernet.load(out / "x.pt").config.step
    assert f"stopped by a signal to another process at step {stopped}; continue with" in err0
    assert (out / f"checkpoint-{stopped}").is_dir() and not our_lines(err0 + err1)

    target = stopped + 3
    for node in two_nodes(
        tmp_path,
        training_flags(
            tiny_model_dir, small_dataset, out, target, "--cache_dir", cache, "--resume_from_checkpoint", "latest"
        ),
    ):
        code, err = node.finish()
        assert code == 0, err[-3000:]
    for node in two_nodes(
        tmp_path, training_flags(tiny_model_dir, small_dataset, tmp_path / "whole", target, "--cache_dir", cache)
    ):
        code, err = node.finish()
        assert code == 0, err[-3000:]
    assert_same_weights(out / "x.pt", tmp_path / "whole" / "x.pt")


@pytest.mark.parametrize("how", ["killed", "silent"])
def test_a_node_that_goes_away_ends_the_other_within_the_timeout_with_one_line(
    tiny_model_dir, small_dataset, tmp_path, how
):
    out = tmp_path / "run"
    flags = training_flags(tiny_model_dir, small_dataset, out, 100000, "--cache_dir", tmp_path / "cache")
    nodes = two_nodes(tmp_path, [*flags, "--checkpointing_steps", "2", "--ddp_timeout", "0.25"])
    wait_for_checkpoint(out, nodes[0])
    nodes[1].signal(signal.SIGKILL if how == "killed" else signal.SIGSTOP)
    started = time.time()
    code, err = nodes[0].finish(120)
    waited = time.time() - started
    nodes[1].signal(signal.SIGKILL)
    assert code != 0 and waited < 15 + 30, waited  # the 15 s timeout, and torchrun's own wind-down
    (line,) = our_lines(err)
    assert re.search(r"error: lost rank 1 on node \S+ \(last at step \d+\): it ended or stopped answering \(", line), (
        line
    )
    assert line.endswith(
        "every process stops here; continue with --resume_from_checkpoint latest once every node is back"
    )
    assert "pair.cc" not in err.replace(line, "") and "gloo" not in err.replace(line, "").lower()
    latest = max((p for p in out.iterdir() if re.fullmatch(r"checkpoint-\d+", p.name)), key=lambda p: int(p.name[11:]))
    assert runs.checkpoint_to_resume(out, "latest") == str(latest)  # whole: the resume takes it


def test_an_in_job_restart_ends_with_one_line_and_the_checkpoints_stay_whole(tiny_model_dir, small_dataset, tmp_path):
    out = tmp_path / "run"
    flags = training_flags(
        tiny_model_dir, small_dataset, out, 100000, "--checkpointing_steps", 2, "--ddp_timeout", 0.25
    )
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max_restarts", "1"]
    launcher += ["--master_port", str(free_port()), os.path.join(ROOT, "train_hypernetwork.py")]
    home = tmp_path / "home"
    home.mkdir()
    log = tmp_path / "restart.log"
    with open(log, "w") as f:
        process = subprocess.Popen(
            [*launcher, *flags, "--resume_from_checkpoint", "latest"], env=dict(ENV, HOME=str(home)), stderr=f
        )
    try:
        deadline = time.time() + 180
        while not (out.is_dir() and any(re.fullmatch(r"checkpoint-\d+", n) for n in os.listdir(out))):
            assert process.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        kill_local_rank(home, 1)
        process.wait(120)
    finally:
        signal_processes(f"HOME={home}", signal.SIGKILL)
    lines = our_lines(log.read_text())
    restarted = [line for line in lines if "in-job restart" in line]
    assert all("in-job restart" in line or "error: lost " in line for line in lines)  # the first group's survivor
    assert restarted and all(
        line.endswith(
            "error: this process is an in-job restart (torchrun --max_restarts), which torch cannot rejoin to a "
            "process group in this version; launch again with --resume_from_checkpoint latest, as the SLURM example "
            "requeues"
        )
        for line in restarted
    ), log.read_text()[-3000:]
    assert runs.checkpoint_to_resume(out, "latest") is not None  # whole


def kill_local_rank(home, local_rank):
    """SIGKILL the trainer of `local_rank` among the processes whose HOME is `home`."""
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                variables = f.read().split(b"\0")
        except OSError:
            continue
        if f"HOME={home}".encode() in variables and f"LOCAL_RANK={local_rank}".encode() in variables:
            os.kill(pid, signal.SIGKILL)


def test_an_output_folder_that_is_not_shared_is_refused_on_every_node(tiny_model_dir, small_dataset, tmp_path):
    flags = training_flags(tiny_model_dir, small_dataset, "out", 4, "--cache_dir", tmp_path / "cache")
    nodes = two_nodes(tmp_path, flags)  # "out" in each node's own working folder
    for node in nodes:
        code, err = node.finish()
        (line,) = our_lines(err)
        assert code != 0 and line.endswith(
            "error: --output_dir out: not the same folder on every node (on "
            + socket.gethostname()
            + " it is another folder); give a folder on a filesystem every node mounts"
        ), err[-2000:]


def test_an_error_on_the_main_process_alone_ends_every_process_with_its_line(tiny_model_dir, small_dataset, tmp_path):
    out = tmp_path / "locked"
    out.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from hypernet import runs; lock = runs.RunLock(sys.argv[1]); time.sleep(600)",
            str(out),
        ],
        cwd=ROOT,
    )
    try:
        time.sleep(3)
        nodes = two_nodes(
            tmp_path, training_flags(tiny_model_dir, small_dataset, out, 4, "--cache_dir", tmp_path / "c")
        )
        for node in nodes:
            code, err = node.finish()
            (line,) = our_lines(err)
            assert code != 0 and f"error: --output_dir {out}: another run is writing to it (pid {holder.pid})" in line
            assert "pair.cc" not in err and "Connection reset" not in err
    finally:
        holder.kill()


def test_a_full_disk_on_the_main_process_ends_every_process_with_its_line(tiny_model_dir, small_dataset, tmp_path):
    with small_disk(tmp_path / "disk", size="12m") as mounted:
        if not mounted:
            pytest.skip("needs a tmpfs mount (root)")
        out = tmp_path / "disk" / "run"
        flags = training_flags(tiny_model_dir, small_dataset, out, 200, "--checkpointing_steps", 1)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        launcher += ["--master_port", str(free_port()), os.path.join(ROOT, "train_hypernetwork.py")]
        run = subprocess.run([*launcher, *flags], env=ENV, capture_output=True, text=True, timeout=300)
        lines = our_lines(run.stderr)
        assert run.returncode != 0 and len(lines) == 2 and lines[0] == lines[1], run.stderr[-3000:]
        assert "could not write the checkpoint (no space left on the device" in lines[0]
        assert "pair.cc" not in run.stderr and "Connection reset" not in run.stderr
        assert runs.checkpoint_to_resume(out, "latest") is not None  # the one before is whole


def test_resuming_with_another_process_count_keeps_the_global_batch_or_says_how(
    tiny_model_dir, small_dataset, tmp_path
):
    out = tmp_path / "run"
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    script = os.path.join(ROOT, "train_hypernetwork.py")
    flags = training_flags(tiny_model_dir, small_dataset, out, 2, "--checkpointing_steps", 2, "--train_batch_size", 1)
    run = subprocess.run([*two, script, *flags], env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((out / "checkpoint-2" / "training_state.json").read_text())["batch"] == {
        "processes": 2,
        "train_batch_size": 1,
        "gradient_accumulation_steps": 1,
    }
    resume = training_flags(tiny_model_dir, small_dataset, out, 4, "--resume_from_checkpoint", "latest")

    def resume_with(batch_size):
        argv = [sys.executable, script, *resume, "--train_batch_size", batch_size]
        return subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=300)

    run = resume_with("1")
    (line,) = our_lines(run.stderr)
    assert run.returncode == 2 and line.endswith(
        "was trained with a global batch of 2 (2 process(es) x --train_batch_size 1 x --gradient_accumulation_steps 1),"
        " this run's is 1 (1 process(es) x --train_batch_size 1 x --gradient_accumulation_steps 1); continue it with "
        "--train_batch_size 2, or --gradient_accumulation_steps 2, or the checkpoint's 2 process(es) x "
        "--train_batch_size 1 x --gradient_accumulation_steps 1"
    ), run.stderr[-2000:]
    run = resume_with("2")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "was trained by 2 process(es), this run has 1: the global batch stays 2" in run.stderr
    assert hypernet.load(out / "x.pt").config.step == 4


def stop_the_job(job, folder, env):
    """SIGUSR1 to the batch script once training runs, as Slurm sends it before the time limit; the step it stopped at."""
    log = folder / "logs" / f"hn-{env['SLURM_JOB_ID']}.log"
    deadline = time.time() + 180
    while not (log.is_file() and re.search(r"\| [1-9]\d*/100000 ", log.read_text())):
        assert job.poll() is None and time.time() < deadline, log.read_text()[-3000:] if log.is_file() else ""
        time.sleep(0.5)
    job.send_signal(signal.SIGUSR1)  # what Slurm sends 180 s before the time limit
    assert job.wait(120) == 0, log.read_text()[-3000:]
    stopped = hypernet.load(folder / "out" / "x.pt").config.step
    assert (folder / "out" / f"checkpoint-{stopped}").is_dir()
    return stopped


def test_the_slurm_example_forwards_the_signal_requeues_and_resumes(tiny_model_dir, small_dataset, tmp_path):
    (tmp_path / "train_hypernetwork.py").symlink_to(os.path.join(ROOT, "train_hypernetwork.py"))
    (tmp_path / "examples").symlink_to(os.path.join(ROOT, "examples"))
    stub_log = tmp_path / "stub.log"
    env = dict(
        ENV,
        PATH=os.path.join(ROOT, "tests", "slurm") + os.pathsep + os.environ["PATH"],
        SLURM_STUB_LOG=str(stub_log),
        SLURM_JOB_ID=str(free_port()),  # the port comes from the job id
        SLURM_JOB_NAME="hn",
        SLURM_NTASKS="2",
        SLURM_CPUS_PER_TASK="1",
        SLURM_JOB_NODELIST="node[1-2]",
        MODEL=tiny_model_dir,
        DATA=small_dataset,
        OUT="out",
        CACHE="cache",
        PYTHON=sys.executable,
    )
    flags = ["--resolution", "64", "--mixed_precision", "no", "--checkpointing_steps", "0", "--save_every", "0"]
    flags += ["--preview_every", "0", "--train_batch_size", "1", "--learning_rate", "1e-3", "--hypernetwork_name", "x"]
    sbatch = ["bash", os.path.join(ROOT, "examples", "slurm_multinode.sbatch"), *flags]
    job = subprocess.Popen([*sbatch, "--max_train_steps", "100000"], env=env, cwd=tmp_path)
    try:
        stopped = stop_the_job(job, tmp_path, env)
    finally:
        signal_processes(f"SLURM_STUB_LOG={stub_log}", signal.SIGKILL)
    log = tmp_path / "logs" / f"hn-{env['SLURM_JOB_ID']}.log"
    assert stub_log.read_text().splitlines() == [
        "srun --kill-on-bad-exit=1 --cpus-per-task=1",
        f"scontrol requeue {env['SLURM_JOB_ID']}",
    ]
    requeued = subprocess.run([*sbatch, "--max_train_steps", str(stopped + 2)], env=env, cwd=tmp_path, timeout=300)
    assert requeued.returncode == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert f"resumed from out/checkpoint-{stopped} at step {stopped}" in text
    assert hypernet.load(tmp_path / "out" / "x.pt").config.step == stopped + 2
    assert stub_log.read_text().count("scontrol requeue") == 1, "a run that ended is not requeued"
