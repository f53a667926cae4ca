"""Write a diffusers SD 1.x pipeline as one original-layout (LDM) checkpoint file, so that --from_single_file can be
tested without a download. The inverse of diffusers' convert_ldm_*_checkpoint for the layouts it reads."""

from safetensors.torch import save_file

RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]
VAE_ATTENTION = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def unet_keys(config):
    """diffusers prefix -> LDM prefix, and whether the block is a resnet."""
    per = config["layers_per_block"] + 1
    levels = len(config["block_out_channels"])
    mapping = [
        ("time_embedding.linear_1", "time_embed.0", False),
        ("time_embedding.linear_2", "time_embed.2", False),
        ("conv_in", "input_blocks.0.0", False),
        ("conv_norm_out", "out.0", False),
        ("conv_out", "out.2", False),
        ("mid_block.resnets.0", "middle_block.0", True),
        ("mid_block.attentions.0", "middle_block.1", False),
        ("mid_block.resnets.1", "middle_block.2", True),
    ]
    for i in range(levels):
        for j in range(per - 1):
            mapping.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{1 + i * per + j}.0", True))
            mapping.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{1 + i * per + j}.1", False))
        mapping.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(i + 1) * per}.0.op", False))
        attention = "CrossAttn" in config["up_block_types"][i]
        for j in range(per):
            mapping.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{i * per + j}.0", True))
            mapping.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{i * per + j}.1", False))
        mapping.append(
            (
                f"up_blocks.{i}.upsamplers.0.conv",
                f"output_blocks.{i * per + per - 1}.{2 if attention else 1}.conv",
                False,
            )
        )
    return mapping


def convert_unet(unet):
    mapping = unet_keys(unet.config)
    out = {}
    for key, tensor in unet.state_dict().items():
        for new, old, resnet in mapping:
            if key.startswith(new + "."):
                rest = key[len(new) + 1 :]
                if resnet:
                    for a, b in RESNET:
                        rest = rest.replace(a, b)
                out["model.diffusion_model." + old + "." + rest] = tensor
                break
        else:
            raise KeyError(key)
    return out


def convert_vae(vae):
    blocks = len(vae.config["block_out_channels"])
    out = {}
    for key, tensor in vae.state_dict().items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = new.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        if "mid_block.attentions.0" in new:
            new = new.replace("mid_block.attentions.0", "mid.attn_1")
            for a, b in VAE_ATTENTION:
                new = new.replace(f".{a}.", f".{b}.")
            if tensor.dim() == 2:
                tensor = tensor[:, :, None, None]
        for i in range(blocks):
            new = new.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            new = new.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            new = new.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{blocks - 1 - i}.block.")
            new = new.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{blocks - 1 - i}.upsample.")
        out["first_stage_model." + new] = tensor
    return out


def write_ldm_checkpoint(pipeline, path):
    tensors = convert_unet(pipeline.unet) | convert_vae(pipeline.vae)
    for key, tensor in pipeline.text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else "text_model." + key  # transformers 5 dropped the level
        tensors["cond_stage_model.transformer." + key] = tensor
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
