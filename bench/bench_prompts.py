"""Peak memory of generate.py under prompts that ask for unbounded work, against a plain prompt, side by side.

Each case is one generate.py process on the same tiny model (its peak resident memory read from the kernel when it
ends): a hypernetwork tag once and repeated to the cap of 32 (one copy of the file's weights either way), the longest
prompt taken (100 chunks of 75 tokens) and one past it, and a 10 MB line (refused before the model loads). The
hypernetwork is made large (--layer_structure 1,L,1) so that a copy per repeat would show.

    python bench/bench_prompts.py --layer_width 64

Prints one JSON line: peak MiB per case and each case's ratio to the plain prompt.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

# No torch in this process: a child's peak resident memory counts its parent's at the fork.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAKE_HYPERNETWORK = """
import sys, hypernet
hn = hypernet.Hypernetwork([96, 40, 80, 160], layer_structure=[1, int(sys.argv[2]), 1])  # the tiny preset's widths
hypernet.save(hn, sys.argv[1])
"""


def cases(layer_width):
    tag = "<hypernet:big:0.5> "
    return {
        "plain": "a cat",
        "one_tag": tag + "a cat",
        "32_tags": tag * 32 + "a cat",
        "100_chunks": "a " * (75 * 100),  # one token each in the tiny tokenizer
        "101_chunks": "a " * (75 * 100 + 1),
        "10_mb_line": "cat " * (10 * 2**20 // 4),
    }


def peak_mib(model, hypernetwork_dir, output_dir, prompt, workdir):
    """(peak resident MiB, exit code) of one generate.py process; the prompt travels in a file (argv is bounded)."""
    prompts = os.path.join(workdir, "prompt.txt")
    with open(prompts, "w", encoding="utf-8") as f:
        f.write(prompt + "\n")
    argv = [sys.executable, os.path.join(ROOT, "generate.py"), "--pretrained_model_name_or_path", model]
    argv += ["--prompts_file", prompts, "--hypernetwork_dir", hypernetwork_dir, "--output_dir", output_dir]
    argv += ["--num_inference_steps", "1", "--no_progress", "--width", "64", "--height", "64"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 1024, process.returncode


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer_width", type=int, default=64, help="L of the hypernetwork's layer structure 1,L,1.")
    parser.add_argument("--only", nargs="+", default=None, help="Run these cases alone (and plain, the reference).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        model = os.path.join(workdir, "model")
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "check": True}
        subprocess.run(
            [sys.executable, os.path.join(ROOT, "examples", "make_tiny_model.py"), "--output_dir", model], **quiet
        )
        hypernetwork_dir = os.path.join(workdir, "hypernetworks")
        os.mkdir(hypernetwork_dir)
        big = os.path.join(hypernetwork_dir, "big.pt")
        subprocess.run([sys.executable, "-c", MAKE_HYPERNETWORK, big, str(args.layer_width)], cwd=ROOT, **quiet)
        file_mib = os.path.getsize(os.path.join(hypernetwork_dir, "big.pt")) / 2**20
        peaks, exit_codes = {}, {}
        for name, prompt in cases(args.layer_width).items():
            if args.only and name not in {"plain", *args.only}:
                continue
            output_dir = os.path.join(workdir, "out-" + name)
            peaks[name], exit_codes[name] = peak_mib(model, hypernetwork_dir, output_dir, prompt, workdir)
    print(
        json.dumps(
            {
                "bench": "prompts",
                "machine": f"CPU, {os.cpu_count()} cores",
                "layer_width": args.layer_width,
                "hypernetwork_file_mib": round(file_mib, 1),
                "peak_mib": {name: round(value, 1) for name, value in peaks.items()},
                "exit_codes": exit_codes,
                "ratios": {f"{name}/plain": peaks[name] / peaks["plain"] for name in peaks if name != "plain"},
            }
        )
    )


if __name__ == "__main__":
    main()
