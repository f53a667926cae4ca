"""Seconds per image at 20 steps: the plain pipeline, one hypernetwork, two stacked; interleaved in one process.

Hypernetworks are attached as generate.py attaches them, merged into to_k/to_v where they are linear, once per
prompt (setup_seconds_per_prompt, outside the per-image time); the `one_wrapped` variant runs the same
hypernetwork unmerged (its modules applied in every layer and step). With --torch_compile, `plain_compiled` and
`one_compiled` run the plain and the one-hypernetwork (merged) variants on a second pipeline whose UNet
transformer blocks are compiled (hypernet.compile_blocks); their first image pays the compilation
(first_image_seconds).

    python bench/bench_generate.py --preset sd15 --resolution 512

Prints one JSON line with the medians and the ratios to the plain pipeline.
"""

import argparse
import json

import torch
from common import PRESETS, PageFaults, PeakMemory, build, machine, median, rotated, timed

import hypernet
from hypernet.formats import DTYPES
from hypernet.memory import retain_freed_memory


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="sd15", help="Model architecture (random weights)."
    )
    parser.add_argument("--resolution", type=int, default=512, help="Image side in pixels.")
    parser.add_argument(
        "--activation_func", default="linear", help="The hypernetworks' activation (the webui's default: linear)."
    )
    parser.add_argument("--num_inference_steps", type=int, default=20, help="Denoising steps per image.")
    parser.add_argument("--rounds", type=int, default=3, help="Timed rounds (each generates once per variant).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Device.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="Default: fp16 on CUDA, else fp32.")
    parser.add_argument(
        "--release_freed_memory",
        action="store_true",
        help="On the CPU, leave glibc's default of returning freed memory to the kernel (hypernet.memory).",
    )
    parser.add_argument("--no_flops", action="store_true", help="Skip the FLOP count of one image per variant.")
    parser.add_argument(
        "--torch_compile", action="store_true", help="Add plain_compiled and one_compiled (regional compilation)."
    )
    parser.add_argument(
        "--torch_compile_mode",
        default="default",
        choices=hypernet.attachment.COMPILE_MODES,
        help="torch.compile mode.",
    )
    args = parser.parse_args()

    dtype_name = args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
    pipeline = build(args.preset, args.device, DTYPES[dtype_name])
    widths = hypernet.attention_widths(pipeline.unet)
    stacks = {
        "plain": [],
        "one": [
            hypernet.Hypernetwork(widths, activation_func=args.activation_func, weight_init="XavierNormal").eval()
        ],
        "two": [
            hypernet.Hypernetwork(widths, activation_func=args.activation_func, weight_init="XavierNormal")
            .eval()
            .set_multiplier(0.6)
            for _ in range(2)
        ],
    }
    stacks["one_wrapped"] = stacks["one"]
    attachments = {"eager": (pipeline, hypernet.attach(pipeline.unet, [], merge=True))}
    if args.torch_compile:
        compiled = build(args.preset, args.device, DTYPES[dtype_name])
        attachments["compiled"] = (compiled, hypernet.attach(compiled.unet, [], merge=True))
        hypernet.compile_blocks(compiled.unet, args.torch_compile_mode)
        stacks["plain_compiled"], stacks["one_compiled"] = stacks["plain"], stacks["one"]
    current = {}

    for stack in stacks.values():
        for hn in stack:
            hn.to(args.device)

    def use(name):
        """Set up a variant's stack as generate.py does for a prompt: merged once, before its images."""
        current["pipeline"], attachment = attachments["compiled" if name.endswith("_compiled") else "eager"]
        attachment.hypernetworks[:] = stacks[name]
        attachment.unmerge() if name == "one_wrapped" else attachment.merge()

    def generate():
        current["pipeline"](
            "a castle on a hill",
            num_inference_steps=args.num_inference_steps,
            width=args.resolution,
            height=args.resolution,
            generator=torch.Generator(args.device).manual_seed(0),
        )

    first_image = {}  # for the compiled variants, their compilation
    for name in stacks:
        use(name)
        first_image[name] = timed(args.device, generate)
    # Peak memory first: on the CPU it is read from the resident set, which stops moving once freed memory is kept.
    peaks = {}
    for name in stacks:
        use(name)
        with PeakMemory(args.device) as peak:
            generate()
        peaks[name] = peak.peak_above_start
    retain = args.device == "cpu" and not args.release_freed_memory
    if retain:
        retain_freed_memory()  # the first round grows the heap to its peak: the median leaves that out
    times = {name: [] for name in stacks}
    faults = {name: [] for name in stacks}
    setup = {name: [] for name in stacks}
    for round_ in range(args.rounds):
        for name in rotated(list(stacks), round_):
            setup[name].append(timed(args.device, lambda name=name: use(name)))
            with PageFaults() as counted:
                times[name].append(timed(args.device, generate))
            faults[name].append(counted.faults)
    seconds = {name: median(values) for name, values in times.items()}
    flops = {}
    if not args.no_flops:
        from torch.utils.flop_counter import FlopCounterMode

        for name in [name for name in stacks if not name.endswith("_compiled")]:
            use(name)
            with FlopCounterMode(display=False) as counter:
                generate()
            flops[name] = counter.get_total_flops()
    print(
        json.dumps(
            {
                "bench": "generate",
                "machine": machine(),
                "preset": args.preset,
                "resolution": args.resolution,
                "dtype": dtype_name,
                "activation_func": args.activation_func,
                "num_inference_steps": args.num_inference_steps,
                "rounds": args.rounds,
                "seconds_per_image": seconds,
                "setup_seconds_per_prompt": {name: median(values) for name, values in setup.items()},
                "peak_memory_mib_above_weights": {name: round(p / 2**20, 1) for name, p in peaks.items()},
                "retain_freed_memory": retain,
                "page_faults_per_image": {name: median(values) for name, values in faults.items()},
                "ratios": {
                    "one/plain": seconds["one"] / seconds["plain"],
                    "two/plain": seconds["two"] / seconds["plain"],
                    "one_wrapped/plain": seconds["one_wrapped"] / seconds["plain"],
                },
                "first_image_seconds": first_image,
                "compiled_ratios": {
                    f"{name}_compiled/{name}": seconds[f"{name}_compiled"] / seconds[name]
                    for name in ("plain", "one")
                    if f"{name}_compiled" in seconds
                },
                "gflop_per_image": {name: round(f / 1e9, 1) for name, f in flops.items()},
                "flop_ratios": {f"{name}/plain": flops[name] / flops["plain"] for name in flops if name != "plain"},
            }
        )
    )


if __name__ == "__main__":
    main()
