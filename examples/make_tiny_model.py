"""Build a Stable Diffusion pipeline from config with random weights, saved with save_pretrained. No download.

    python examples/make_tiny_model.py --output_dir models/tiny-sd
    python examples/make_tiny_model.py --output_dir models/sd15-random --preset sd15

Presets:
  tiny  SD 1.x layout, attention widths 40, 80, 160 and a 96-wide text context (those of ../shared/a1111/),
        epsilon prediction; for tests and the quickstart.
  sd2   the tiny model with a 128-wide text context and v-prediction, standing in for SD 2.x (1024).
  sdxl  an SDXL layout (two text encoders, 32 + 64 = 96-wide context, attention widths 80 and 160).
  sd15  the real SD 1.5 UNet, text encoder and VAE architectures at random weights, for benchmarks.
"""

import argparse
import json
import os
import sys

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from hypernet.prompts import byte_encoder  # CLIP's bytes_to_unicode: the vocabulary's spelling of each byte


def write_tokenizer_files(directory, pad_token="<|endoftext|>", merges=()):
    """A CLIP BPE vocabulary: every byte, alone and word-final, the tokens `merges` (pairs of symbols, in the order
    BPE applies them) make, and the specials. Without merges it is character-level. OpenCLIP encoders (SD 2.x,
    SDXL's second) pad with '!', as in diffusers' folders of the real models."""
    os.makedirs(directory, exist_ok=True)
    chars = list(byte_encoder().values())
    tokens = chars + [c + "</w>" for c in chars]
    tokens += [a + b for a, b in merges if a + b not in tokens]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer(
        os.path.join(directory, "vocab.json"),
        os.path.join(directory, "merges.txt"),
        model_max_length=77,
        pad_token=pad_token,
    )


PRESETS = {
    "tiny": dict(
        unet=dict(
            sample_size=16,
            block_out_channels=(40, 80, 160),
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=96,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3,
            up_block_types=("CrossAttnUpBlock2D",) * 3,
        ),
        text=dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4),
        vae=dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8),
        prediction_type="epsilon",
    ),
    "sd15": dict(
        unet=dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
        prediction_type="epsilon",
    ),
}
PRESETS["sdxl"] = dict(
    PRESETS["tiny"],
    unet=dict(
        PRESETS["tiny"]["unet"],
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 64,
    ),
    text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    text_2=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
)
PRESETS["sdxl_full"] = dict(  # SDXL 1.0's architecture at full size (random weights): for the benchmarks
    unet=dict(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
    text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    text_2=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20),
    vae=PRESETS["sd15"]["vae"],
    prediction_type="epsilon",
)
PRESETS["sd2"] = dict(
    PRESETS["tiny"],
    unet=dict(PRESETS["tiny"]["unet"], cross_attention_dim=128),
    text=dict(PRESETS["tiny"]["text"], hidden_size=128, intermediate_size=256),
    prediction_type="v_prediction",
)


def make_tiny_model(output_dir, preset="tiny", seed=0):
    """Build the preset's pipeline with seeded random weights, save it to output_dir, and return it."""
    pipeline = build_pipeline(preset, seed, tokenizer_dir=os.path.join(output_dir, "tokenizer"))
    pipeline.save_pretrained(output_dir)
    return pipeline


def build_unet(preset="tiny", seed=0):
    """The preset's UNet and noise scheduler alone, with seeded random weights (what training benchmarks need)."""
    config = PRESETS[preset]
    torch.manual_seed(seed)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=config["prediction_type"]
    )
    return UNet2DConditionModel(in_channels=4, out_channels=4, **config["unet"]), scheduler


def with_random_final_norm(text_encoder):
    """A trained text encoder's final layer norm has gains and biases of its own; at its initial weight 1 and bias 0
    every chunk of context has a mean of about 0, which the webui's emphasis divides by."""
    norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(norm.weight.shape))
        norm.bias.copy_(0.3 + 0.2 * torch.randn(norm.bias.shape))
    return text_encoder


def build_pipeline(preset="tiny", seed=0, tokenizer_dir=None):
    """The preset's pipeline with seeded random weights, in memory."""
    import tempfile

    config = PRESETS[preset]
    torch.manual_seed(seed)
    tokenizer_dir = tokenizer_dir or tempfile.mkdtemp(prefix="hypernet-tokenizer-")
    open_clip = preset.startswith("sd2")
    tokenizer = write_tokenizer_files(tokenizer_dir, "!" if open_clip else "<|endoftext|>")
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **config["unet"])

    def text_config(sizes):
        return CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=sizes["hidden_size"],
            **sizes,
        )

    text_encoder = with_random_final_norm(CLIPTextModel(text_config(config["text"])))
    vae_blocks = len(config["vae"]["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * vae_blocks,
        up_block_types=("UpDecoderBlock2D",) * vae_blocks,
        sample_size=config["unet"]["sample_size"] * 2 ** (vae_blocks - 1),
        **config["vae"],
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=config["prediction_type"],
    )
    if preset.startswith("sdxl"):
        scheduler = EulerDiscreteScheduler.from_config(scheduler.config)
        pipeline = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=with_random_final_norm(CLIPTextModelWithProjection(text_config(config["text_2"]))),
            tokenizer=tokenizer,
            tokenizer_2=write_tokenizer_files(tokenizer_dir + "_2", "!"),
            unet=unet,
            scheduler=scheduler,
        )
        return pipeline
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="Folder to write the diffusers pipeline to.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="Which architecture to build.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the random weights.")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    make_tiny_model(args.output_dir, args.preset, args.seed)
    print(f"wrote a random-weight {args.preset} Stable Diffusion to {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
