"""Seconds per optimizer step of hypernetwork training against the floor and the alternatives, side by side.

    python bench/bench_train.py --preset sd15 --resolution 256 --steps 5

Variants, timed interleaved in one process after warm-up, batch --batch_size (1), median over --steps rounds:
  floor     the frozen UNet's forward and backward to its inputs: no trainable weights at all
  hypernet  our hypernetwork step (hypernet.training: diffusion_loss, UNetWithHypernetwork, fused AdamW)
  lora      a rank-4 LoRA on to_q/to_k/to_v/to_out.0 through peft, as diffusers' LoRA script trains
  a1111     the same hypernetwork applied A1111's way: every attention layer runs its own MLPs (no text-context
            cache, linear modules not multiplied out), torch's default AdamW as the webui uses
  hypernet_layers (linear hypernetworks) our step with the layers run one by one, not multiplied out
  hypernet_8bit (with --use_8bit_adam) the hypernetwork step with bitsandbytes' AdamW8bit
  floor_compiled, hypernet_compiled (with --torch_compile) floor and hypernet on a copy of the UNet whose
            transformer blocks are compiled (hypernet.compile_blocks: regional compilation, inductor)
The FLOP floor of hypernet/floor is measured with torch.utils.flop_counter on one step of each.
Prints one JSON line.
"""

import argparse
import contextlib
import copy
import json
import sys

import torch
import torch.nn.functional as F
from common import PRESETS, PageFaults, PeakMemory, build_unet, machine, median, median_interval, rotated, sync, timed

import hypernet
from hypernet.formats import DTYPES
from hypernet.memory import retain_freed_memory
from hypernet.training import UNetWithHypernetwork, diffusion_loss, fused_kwargs


def make_batch(pipeline, resolution, device, dtype, seed=0, size=1):
    generator = torch.Generator().manual_seed(seed)
    side = resolution // pipeline.vae_scale_factor
    width = pipeline.unet.config.cross_attention_dim
    batch = {
        "latents": torch.randn(size, 4, side, side, generator=generator).to(device, dtype),
        "noise": torch.randn(size, 4, side, side, generator=generator).to(device, dtype),
        "timesteps": torch.randint(0, 1000, (size,), generator=generator).to(device),
        "encoder_hidden_states": torch.randn(size, 77, width, generator=generator).to(device, dtype),
        "weight": None,
    }
    if pipeline.unet.config.addition_embed_type == "text_time":  # SDXL: pooled text and (size, crop, size) ids
        pooled = (
            pipeline.unet.config.projection_class_embeddings_input_dim
            - 6 * pipeline.unet.config.addition_time_embed_dim
        )
        batch["added_cond_kwargs"] = {
            "text_embeds": torch.randn(size, pooled, generator=generator).to(device, dtype),
            "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * size).to(
                device, dtype
            ),
        }
    return batch


def make_variants(pipeline, args, device, dtype):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    unet = pipeline.unet
    amp = dict(device_type=device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)
    batch = make_batch(pipeline, args.resolution, device, dtype, size=args.batch_size)

    def floor(unet):
        def step():
            latents = batch["latents"].clone().requires_grad_(True)
            with torch.autocast(**amp):
                noisy = scheduler.add_noise(latents, batch["noise"], batch["timesteps"])
                prediction = unet(
                    noisy,
                    batch["timesteps"],
                    batch["encoder_hidden_states"],
                    added_cond_kwargs=batch.get("added_cond_kwargs"),
                ).sample
                loss = F.mse_loss(prediction.float(), batch["noise"].float())
            scaler.scale(loss).backward()

        return step

    def trainer(model, parameters, optimizer_class, fused=False):
        parameters = list(parameters)
        optimizer = optimizer_class(
            parameters, lr=1e-5, **(fused_kwargs(optimizer_class, parameters) if fused else {})
        )

        def step():
            with torch.autocast(**amp):
                loss = diffusion_loss(model, scheduler, batch)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

        step.optimizer = optimizer
        return step

    widths = hypernet.attention_widths(unet)
    hn = hypernet.Hypernetwork(widths, activation_func=args.activation_func).to(device).train()
    ours = UNetWithHypernetwork(unet, hn)
    ours.attachment.detach()  # attached per step below, so the variants can share the UNet

    class Attached:
        """A step run with the hypernetwork attached; attaching happens outside the timed step."""

        def __init__(self, step, text_context_once=True, use_linear_maps=True):
            self.step, self.optimizer = step, step.optimizer
            self.text_context_once, self.use_linear_maps = text_context_once, use_linear_maps

        def __enter__(self):
            self.attachment = hypernet.attach(unet, [hn], use_linear_maps=self.use_linear_maps)
            self.attachment.text_context_once = self.text_context_once

        def __exit__(self, *exc):
            self.attachment.detach()

        def __call__(self):
            self.step()

    variants = {
        "floor": floor(unet),
        "hypernet": Attached(trainer(ours, hn.parameters(), torch.optim.AdamW, fused=True)),
        "a1111": Attached(
            trainer(ours, hn.parameters(), torch.optim.AdamW), text_context_once=False, use_linear_maps=False
        ),
    }
    if all(module.is_linear for module in hn.modules() if isinstance(module, hypernet.HypernetworkModule)):
        variants["hypernet_layers"] = Attached(
            trainer(ours, hn.parameters(), torch.optim.AdamW, fused=True), use_linear_maps=False
        )
    if args.torch_compile:
        # Copies of their own: compiling changes the blocks in place, and attaching per step would compile again.
        variants["floor_compiled"] = floor(hypernet.compile_blocks(copy.deepcopy(unet), args.torch_compile_mode))
        compiled_hn = copy.deepcopy(hn)
        compiled_model = UNetWithHypernetwork(copy.deepcopy(unet), compiled_hn)
        hypernet.compile_blocks(compiled_model.unet, args.torch_compile_mode)
        variants["hypernet_compiled"] = trainer(
            compiled_model, compiled_hn.parameters(), torch.optim.AdamW, fused=True
        )
    if args.use_8bit_adam:
        import bitsandbytes

        variants["hypernet_8bit"] = Attached(trainer(ours, hn.parameters(), bitsandbytes.optim.AdamW8bit))
    lora_fits = args.preset != "sdxl"  # LoRA copies the whole UNet: two copies of SDXL's do not fit in 24 GiB
    if lora_fits and not args.no_lora and (args.only is None or "lora" in args.only):
        from peft import LoraConfig

        lora_unet = copy.deepcopy(unet)
        lora_unet.add_adapter(
            LoraConfig(
                r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]
            )
        )
        lora_parameters = [p for p in lora_unet.parameters() if p.requires_grad]
        for p in lora_parameters:
            p.data = p.data.float()

        class LoraModel(torch.nn.Module):
            def forward(self, noisy, timesteps, context, added_cond_kwargs=None):
                return lora_unet(noisy, timesteps, context, added_cond_kwargs=added_cond_kwargs).sample

        variants["lora"] = trainer(LoraModel(), lora_parameters, torch.optim.AdamW)
    return variants, hn


@contextlib.contextmanager
def prepared(step):
    """Enter a variant's setup (attaching the hypernetwork) if it has one."""
    if hasattr(step, "__enter__"):
        with step:
            yield
    else:
        yield


def optimizer_state_bytes(optimizer):
    return sum(
        t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)
    )


def optimizer_step_seconds(hn, device, rounds=7):
    """One AdamW step over the hypernetwork's parameters: torch's default implementation against the fused one."""
    parameters = [torch.nn.Parameter(p.detach().clone()) for p in hn.parameters()]
    for p in parameters:
        p.grad = torch.randn_like(p)
    optimizers = {
        "default": torch.optim.AdamW(parameters, lr=1e-5),
        "fused": torch.optim.AdamW(parameters, lr=1e-5, **fused_kwargs(torch.optim.AdamW, parameters)),
    }
    times = {name: [] for name in optimizers}
    for _ in range(rounds + 1):
        for name, optimizer in optimizers.items():
            times[name].append(timed(device, optimizer.step))
    return {name: median(values[1:]) for name, values in times.items()}


def measure_flops(fn):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def device_busy_seconds(variants, device, steps=3):
    """Per variant, the seconds per step the GPU spends running kernels (torch.profiler's device time, summed over
    every kernel), beside the wall time: where it is far below, the step waits on the CPU launching kernels."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    busy = {}
    for name, step in variants.items():
        with prepared(step), torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            sync(device)
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy[name] = sum(e.time_range.elapsed_us() for e in kernels) / 1e6 / steps
    return busy


def profile(variants, device):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    sort = "cuda_time_total" if device.startswith("cuda") else "cpu_time_total"
    for name in ("floor", "hypernet"):
        with prepared(variants[name]), torch_profile(activities=activities) as prof:
            variants[name]()
            sync(device)
        print(f"--- profile: {name}", file=sys.stderr)
        print(prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=60), file=sys.stderr)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="sd15",
        help="Model architecture (random weights): sd15, sdxl (full size), tiny, tiny_sdxl.",
    )
    parser.add_argument("--resolution", type=int, default=256, help="Image side in pixels.")
    parser.add_argument("--batch_size", type=int, default=1, help="Images per step.")
    parser.add_argument(
        "--activation_func",
        default="linear",
        help="The hypernetwork's activation (train_hypernetwork.py's and the webui's default: linear).",
    )
    parser.add_argument("--steps", type=int, default=5, help="Timed rounds (each runs every variant once).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed rounds first.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Device.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="Frozen weights and autocast dtype.")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="Checkpoint the UNet's blocks.")
    parser.add_argument("--use_8bit_adam", action="store_true", help="Add the AdamW8bit hypernetwork variant.")
    parser.add_argument("--no_lora", action="store_true", help="Leave out the LoRA variant.")
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="Time only these variants besides floor and hypernet (none named: just those two, for more rounds).",
    )
    parser.add_argument("--no_flops", action="store_true", help="Skip the FLOP count.")
    parser.add_argument(
        "--torch_compile", action="store_true", help="Add floor_compiled and hypernet_compiled (regional compilation)."
    )
    parser.add_argument(
        "--torch_compile_mode",
        default="default",
        choices=hypernet.attachment.COMPILE_MODES,
        help="torch.compile mode.",
    )
    parser.add_argument(
        "--release_freed_memory",
        action="store_true",
        help="On the CPU, leave glibc's default of returning freed memory to the kernel (hypernet.memory).",
    )
    parser.add_argument("--profile", action="store_true", help="Print torch.profiler's top ops of floor and hypernet.")
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = DTYPES[args.dtype]
    pipeline = build_unet(args.preset, args.device, dtype)
    if args.gradient_checkpointing:
        pipeline.unet.enable_gradient_checkpointing()
    variants, hn = make_variants(pipeline, args, args.device, dtype)
    if args.only is not None:
        unknown = set(args.only) - set(variants)
        if unknown:
            parser.error(f"--only: no variant {sorted(unknown)}; the variants are {sorted(variants)}")
        keep = {
            "floor",
            "hypernet",
            *args.only,
            *(("floor_compiled", "hypernet_compiled") if args.torch_compile else ()),
        }
        variants = {name: step for name, step in variants.items() if name in keep}

    first_step = {}  # the first call: for the compiled variants, their compilation
    for _ in range(args.warmup):
        for name, step in variants.items():
            with prepared(step):
                seconds = timed(args.device, step)
            first_step.setdefault(name, seconds)
    # Peak memory first: on the CPU it is read from the resident set, which stops moving once freed memory is kept.
    peaks = {}
    for name, step in variants.items():
        with prepared(step), PeakMemory(args.device) as peak:
            step()
        peaks[name] = peak.peak_above_start
    retain = args.device == "cpu" and not args.release_freed_memory
    if retain:
        retain_freed_memory()
        for step in variants.values():  # the heap grows to its peak once
            with prepared(step):
                step()
    times = {name: [] for name in variants}
    faults = {name: [] for name in variants}
    for round_ in range(args.steps):
        for name in rotated(list(variants), round_):
            step = variants[name]
            with prepared(step), PageFaults() as counted:
                times[name].append(timed(args.device, step))
            faults[name].append(counted.faults)
    seconds = {name: median(values) for name, values in times.items()}
    # Each round's own ratio too: the machine's speed drifts between rounds, and the steps of one round see nearly
    # the same machine.
    paired = {
        f"hypernet/{other}": [a / b for a, b in zip(times["hypernet"], times[other])]
        for other in times
        if other != "hypernet"
    }

    result = {
        "bench": "train",
        "machine": machine(),
        "preset": args.preset,
        "resolution": args.resolution,
        "dtype": args.dtype,
        "gradient_checkpointing": args.gradient_checkpointing,
        "steps": args.steps,
        "activation_func": args.activation_func,
        "hypernetwork_parameters": sum(p.numel() for p in hn.parameters()),
        "seconds_per_step": seconds,
        "fastest_seconds_per_step": {name: min(values) for name, values in times.items()},
        "steps_per_second": {name: 1 / s for name, s in seconds.items()},
        "peak_memory_mib_above_weights": {name: round(p / 2**20, 1) for name, p in peaks.items()},
        "retain_freed_memory": retain,
        "page_faults_per_step": {name: median(values) for name, values in faults.items()},
        "ratios": {
            f"hypernet/{other}": seconds["hypernet"] / seconds[other] for other in seconds if other != "hypernet"
        },
        "paired_ratios": {name: median(values) for name, values in paired.items()},
        "paired_ratio_interval_95": {
            name: [round(bound, 3) for bound in median_interval(values)] for name, values in paired.items()
        },
        "seconds_by_round": {name: [round(t, 5) for t in values] for name, values in times.items()},
        "paired_ratio_range": {
            name: [round(min(values), 3), round(max(values), 3)] for name, values in paired.items()
        },
    }
    result["optimizer_step_seconds"] = optimizer_step_seconds(hn, args.device)
    result["first_step_seconds"] = first_step
    result["batch_size"] = args.batch_size
    if args.device.startswith("cuda"):
        result["device_busy_seconds_per_step"] = device_busy_seconds(variants, args.device)
    if args.torch_compile:
        pairs = {
            "floor_compiled/floor": ("floor_compiled", "floor"),
            "hypernet_compiled/hypernet": ("hypernet_compiled", "hypernet"),
            "hypernet_compiled/floor_compiled": ("hypernet_compiled", "floor_compiled"),
        }
        result["compiled_paired_ratios"] = {
            name: median([x / y for x, y in zip(times[a], times[b])]) for name, (a, b) in pairs.items()
        }
        result["compiled_paired_ratio_interval_95"] = {
            name: [round(v, 3) for v in median_interval([x / y for x, y in zip(times[a], times[b])])]
            for name, (a, b) in pairs.items()
        }
        result["torch_compile_mode"] = args.torch_compile_mode
    if "hypernet_8bit" in variants:
        result["optimizer_state_mib"] = {
            name: round(optimizer_state_bytes(variants[name].optimizer) / 2**20, 2)
            for name in ("hypernet", "hypernet_8bit")
        }
    if not args.no_flops:
        flops = {}
        for name in ("floor", "hypernet", "a1111", "lora", "hypernet_layers"):
            if name not in variants:
                continue
            with prepared(variants[name]):
                flops[name] = measure_flops(variants[name])
        result["gflop_per_step"] = {name: round(f / 1e9, 1) for name, f in flops.items()}
        result["flop_ratios"] = {
            f"hypernet/{other}": flops["hypernet"] / flops[other] for other in flops if other != "hypernet"
        }
    if args.profile:
        profile(variants, args.device)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
