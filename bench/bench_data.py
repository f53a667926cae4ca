"""Data pipeline cost: the first epoch (which encodes and caches latents) against later epochs, and training steps
with cached latents and text embeddings against steps that encode every image and caption again.

    python bench/bench_data.py --preset tiny --resolution 128

Uses train_hypernetwork.py's own caching and batching on the shipped style dataset. Prints one JSON line.
"""

import argparse
import json
import os
import time

import torch
from common import DTYPES, ROOT, build, machine, median, timed

import hypernet
import train_hypernetwork as train
from hypernet.memory import retain_freed_memory


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--preset", choices=["sd15", "tiny"], default="tiny", help="Model architecture (random weights)."
    )
    parser.add_argument("--resolution", type=int, default=128, help="Training resolution.")
    parser.add_argument("--train_data_dir", default=os.path.join(ROOT, "examples", "style_dataset"), help="Dataset.")
    parser.add_argument("--epochs", type=int, default=3, help="Epochs timed after the first.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Device.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="Frozen weights dtype.")
    args = parser.parse_args()

    dtype = DTYPES[args.dtype]
    if args.device == "cpu":
        retain_freed_memory()  # as train_hypernetwork.py does on the CPU
    pipeline = build(args.preset, args.device, dtype)
    targs = train.parse_args(["--pretrained_model_name_or_path", ".", "--train_data_dir", args.train_data_dir,
                              "--output_dir", "unused", "--resolution", str(args.resolution)])  # fmt: skip
    entries = train.read_dataset_entries(targs)
    template = train.load_template(None)
    hn = hypernet.Hypernetwork(hypernet.attention_widths(pipeline.unet)).to(args.device).train()
    model = train.UNetWithHypernetwork(pipeline.unet, hn)
    parameters = list(hn.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-5, **train.fused_kwargs(torch.optim.AdamW, parameters))
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    encoders = (pipeline.vae, pipeline.text_encoder, pipeline.tokenizer)

    def step(batch):
        with torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            loss = train.diffusion_loss(model, scheduler, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def epoch(cache, index):
        for i in range(len(cache)):
            step(
                train.make_batch(
                    torch.tensor([i]), cache, index, targs, encoders[1], encoders[2], template, args.device, 1000
                )
            )

    start = time.perf_counter()
    cache = train.cache_dataset(entries, template, targs, *encoders[:2], encoders[2], args.device, dtype, False)
    caching = time.perf_counter() - start
    first = caching + timed(args.device, lambda: epoch(cache, 0))
    later = [timed(args.device, lambda e=e: epoch(cache, e)) for e in range(1, args.epochs + 1)]

    def uncached_epoch():
        for i in range(len(entries)):
            single = train.cache_dataset(
                entries[i : i + 1], template, targs, *encoders[:2], encoders[2], args.device, dtype, False
            )
            step(
                train.make_batch(
                    torch.tensor([0]), single, 0, targs, encoders[1], encoders[2], template, args.device, 1000
                )
            )

    uncached = [timed(args.device, uncached_epoch) for _ in range(2)]
    steps = len(entries)
    print(
        json.dumps(
            {
                "bench": "data",
                "machine": machine(),
                "preset": args.preset,
                "resolution": args.resolution,
                "images": steps,
                "first_epoch_seconds": first,
                "caching_seconds": caching,
                "later_epoch_seconds": median(later),
                "first/later": first / median(later),
                "cached_steps_per_second": steps / median(later),
                "uncached_steps_per_second": steps / median(uncached),
                "cached/uncached": median(uncached) / median(later),
            }
        )
    )


if __name__ == "__main__":
    main()
