"""Make the text-conditioning fixtures with the webui's own code (see README.md beside this file).

    python make_fixtures.py --webui /path/to/stable-diffusion-webui

Run it in an environment with the webui's pinned packages (transformers 4.30.2, open-clip-torch 2.20.0, lark 1.1.2,
ftfy), never in hypernet's. It builds small seeded text encoders, runs the webui's `modules/sd_hijack_clip.py`,
`modules/sd_hijack_open_clip.py`, `modules/prompt_parser.py` and `modules/sd_emphasis.py` on them with the webui's
default settings, and writes what they compute for every prompt in PROMPTS to fixtures.safetensors, with the
encoders' weights in encoders.safetensors and their character-level tokenizer in tokenizer/.
"""

import argparse
import gzip
import json
import os
import subprocess
import sys
import types

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))

# The webui's settings, at their defaults but for the one each case sets (CLIP_stop_at_last_layers).
OPTS = dict(
    emphasis="Original",
    comma_padding_backtrack=20,
    CLIP_stop_at_last_layers=1,
    use_old_emphasis_implementation=False,
    sdxl_clip_l_skip=False,
    textual_inversion_add_hashes_to_infotext=True,
)

# Text encoders small enough to ship, in the shapes of the families' encoders: SD 1.x CLIP, SD 2.x OpenCLIP as
# diffusers holds it (its last layer dropped, so the last hidden state is the webui's "penultimate"), SDXL's CLIP-L
# and OpenCLIP-bigG with its projection.
ENCODERS = {
    "sd1": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4),
    "sd2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, hidden_act="gelu"),
    "sdxl_1": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2),
    "sdxl_2": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        hidden_act="gelu",
        projection_dim=32,
    ),
}


def words(count, comma_every=0):
    """A prompt of `count` tokens for the character-level tokenizer (a token per character; spaces none), with a
    comma every `comma_every` tokens."""
    pieces, n, letter = [], 0, 0
    while n < count:
        if comma_every and n % comma_every == comma_every - 1:
            pieces.append(",")
            n += 1
            continue
        size = min(4, count - n, comma_every - 1 - n % comma_every if comma_every else 4)
        pieces.append("abcdefghijklmnopqrstuvwxyz"[letter % 26] * size)
        letter += 1
        n += size
    return " ".join(pieces)


PROMPTS = {
    "short": ["a red circle on a teal background"],
    "empty": [""],
    "tokens_75": [words(75)],
    "tokens_76": [words(76)],
    "tokens_200": [words(200, comma_every=5)],
    "comma_near_split": [words(70) + ", " + words(10)],
    "comma_far_from_split": [words(40) + ", " + words(50)],
    "comma_at_split": [words(75) + ", " + words(5)],
    "emphasis": ["a (red) circle, ((teal)), [square], [[small]]"],
    "emphasis_weight": ["a (red circle:1.3) on (teal [sky]: 0.5 ) and (blue:+1.2)"],
    "emphasis_nested": ["a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."],
    "emphasis_unbalanced": ["(unbalanced open [and square"],
    "emphasis_stray": ["stray ) closers ] and :1.2) colons : here"],
    "emphasis_long": [words(60) + " (" + words(40) + ":1.4) " + words(30)],
    "escapes": [r"a \(literal\) \[x\] back\\slash and lone \ backslash \:"],
    "break": ["a red circle BREAK a teal square"],
    "break_first": ["BREAK a teal square"],
    "break_weighted": ["(a red BREAK circle)"],
    "break_in_word": ["noBREAKword BREAKS"],
    "break_long": [words(100) + " BREAK " + words(10)],
    "ftfy": ["\u201ccurly\u201d \u2018quotes\u2019 \ufb01ne \uff46\uff55\uff4c\uff4c width, UPPER Case"],
    "html": ["a &amp; b &lt;tag&gt; caf\u00c3\u00a9"],
    "batch": ["a red circle", words(200, comma_every=5), "(a:1.5) b"],
    "batch_empty": ["", "a (red) circle"],
    # '!' is SD 2.x and SDXL's padding token in diffusers' tokenizers, text in the webui's OpenCLIP tokenizer
    "exclamation": ["wow! a red circle!!!"],
    "exclamation_mixed": ["what!? (>_<)! kaomoji, 1girl, !, smile"],
}
CLIP_SKIP_2 = ("short", "tokens_200", "emphasis_weight", "break", "batch", "empty")
# SDXL's cases with the webui's "Clip skip SDXL" setting on (sdxl_clip_l_skip), at Clip skip 1, 2 and 3
CLIP_L_SKIP = ("short", "emphasis_weight", "exclamation")


def write_tokenizer(directory):
    """A character-level CLIP BPE vocabulary with no merges (as examples/make_tiny_model.py writes), and the same
    vocabulary as an OpenCLIP bpe file: the two tokenizers then give the same ids."""
    os.makedirs(directory, exist_ok=True)
    import open_clip.tokenizer as oc

    chars = list(oc.bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    bpe = os.path.join(directory, "..", "openclip_bpe.txt.gz")
    with gzip.open(bpe, "wb") as f:
        f.write(b"#version: 0.2")  # no newline: OpenCLIP would read an empty line as a merge
    return len(tokens), bpe


def seeded_weights(model, seed):
    """Every parameter drawn from one seeded generator, by name; layer norms with random gains and biases (a bias
    off zero keeps the chunk means the 'Original' emphasis divides by well away from 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=generator)
            if "layer_norm" in name or "layernorm" in name:
                p.copy_(1 + 0.2 * noise if name.endswith("weight") else 0.3 + 0.2 * noise)
            elif "embedding" in name:
                p.copy_(0.3 + 0.5 * noise if "token" in name else 0.1 * noise)
            elif p.ndim == 2:
                p.copy_(noise / p.shape[1] ** 0.5)
            else:
                p.copy_(0.1 * noise)


def build_encoders(vocab_size):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    encoders, state, configs = {}, {}, {}
    for seed, (name, sizes) in enumerate(ENCODERS.items()):
        config = CLIPTextConfig(
            vocab_size=vocab_size,
            max_position_embeddings=77,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
            **sizes,
        )
        model = (CLIPTextModelWithProjection if name == "sdxl_2" else CLIPTextModel)(config).eval()
        seeded_weights(model, seed)
        encoders[name] = model
        configs[name] = {
            k: v
            for k, v in config.to_dict().items()
            if k in (*sizes, "vocab_size", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
        }
        state.update({f"{name}/{k}": v.contiguous() for k, v in model.state_dict().items() if "position_ids" not in k})
    return encoders, state, configs


def import_webui(webui):
    """The webui's four modules, with stand-ins for the parts of it they reach that need a whole webui."""
    sys.path.insert(0, webui)
    shared = types.ModuleType("modules.shared")
    shared.opts = types.SimpleNamespace(**OPTS)
    devices = types.ModuleType("modules.devices")
    devices.device = torch.device("cpu")
    devices.torch_npu_set_device = lambda: None
    sd_hijack = types.ModuleType("modules.sd_hijack")
    sd_hijack.model_hijack = None  # replaced by the hijack each wrapper is given
    sys.modules.update({"modules.shared": shared, "modules.devices": devices, "modules.sd_hijack": sd_hijack})
    from modules import sd_hijack_clip, sd_hijack_open_clip

    return shared.opts, sd_hijack_clip, sd_hijack_open_clip


class NoEmbeddings:
    """The hijack's textual-inversion database with no embeddings loaded."""

    def find_embedding_at_position(self, tokens, offset):
        return None, None


def hijack():
    return types.SimpleNamespace(embedding_db=NoEmbeddings(), fixes=None, extra_generation_params={})


def webui_embedders(encoders, tokenizer_dir, bpe, sd_hijack_clip, sd_hijack_open_clip):
    """{family: function(prompts) -> (embeddings, pooled or None)}, each the webui's wrapper of its encoder."""
    import open_clip.tokenizer as oc
    from transformers import CLIPTokenizer

    clip_tokenizer = CLIPTokenizer(
        os.path.join(tokenizer_dir, "vocab.json"), os.path.join(tokenizer_dir, "merges.txt")
    )
    sd_hijack_open_clip.tokenizer = oc.SimpleTokenizer(bpe)

    sd1 = sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords(
        types.SimpleNamespace(tokenizer=clip_tokenizer, transformer=encoders["sd1"]), hijack()
    )

    # ldm's FrozenOpenCLIPEmbedder with layer "penultimate" runs every block but the last, then ln_final: what
    # diffusers' SD 2 text encoder (the last block dropped) returns as its last hidden state.
    def sd2_transformer(tokens):
        return encoders["sd2"](input_ids=tokens).last_hidden_state

    sd2 = sd_hijack_open_clip.FrozenOpenCLIPEmbedderWithCustomWords(
        types.SimpleNamespace(encode_with_transformer=sd2_transformer), hijack()
    )

    # SDXL: sgm's FrozenCLIPEmbedder (layer "hidden", layer_idx 11 of 12: the penultimate hidden state) and
    # FrozenOpenCLIPEmbedder2 (layer "penultimate", no ln_final; pooled: ln_final of the last block at the first end
    # token, projected), whose outputs sgm's GeneralConditioner concatenates along the channels.
    layers = ENCODERS["sdxl_1"]["num_hidden_layers"]
    clip_l = sd_hijack_clip.FrozenCLIPEmbedderForSDXLWithCustomWords(
        types.SimpleNamespace(
            tokenizer=clip_tokenizer, transformer=encoders["sdxl_1"], layer="hidden", layer_idx=layers - 1
        ),
        hijack(),
    )

    def bigg_transformer(tokens):
        out = encoders["sdxl_2"](input_ids=tokens, output_hidden_states=True)
        return {"penultimate": out.hidden_states[-2], "pooled": out.text_embeds}

    bigg = sd_hijack_open_clip.FrozenOpenCLIPEmbedder2WithCustomWords(
        types.SimpleNamespace(encode_with_transformer=bigg_transformer, layer="penultimate", return_pooled=True),
        hijack(),
    )

    def sdxl(prompts):
        z1 = clip_l(prompts)
        z2, pooled = bigg(prompts)
        return torch.cat([z1, z2], dim=-1), pooled

    return {"sd1": lambda p: (sd1(p), None), "sd2": lambda p: (sd2(p), None), "sdxl": sdxl}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--webui", required=True, help="A checkout of AUTOMATIC1111/stable-diffusion-webui.")
    parser.add_argument("--output_dir", default=HERE, help="Where the fixtures go (default: beside this script).")
    args = parser.parse_args()

    tokenizer_dir = os.path.join(args.output_dir, "tokenizer")
    vocab_size, bpe = write_tokenizer(tokenizer_dir)
    encoders, state, configs = build_encoders(vocab_size)
    opts, sd_hijack_clip, sd_hijack_open_clip = import_webui(args.webui)
    embedders = webui_embedders(encoders, tokenizer_dir, bpe, sd_hijack_clip, sd_hijack_open_clip)

    tensors = {}
    with torch.no_grad():
        for family, embed in embedders.items():
            for case, prompts in PROMPTS.items():
                for clip_skip in (1, 2) if case in CLIP_SKIP_2 else (1,):
                    opts.CLIP_stop_at_last_layers = clip_skip
                    embeddings, pooled = embed(prompts)
                    tensors[f"{family}/{case}/clip_skip_{clip_skip}/embeddings"] = embeddings.contiguous()
                    if pooled is not None:
                        tensors[f"{family}/{case}/clip_skip_{clip_skip}/pooled"] = pooled.contiguous()
        opts.sdxl_clip_l_skip = True
        for case in CLIP_L_SKIP:
            for clip_skip in (1, 2, 3):
                opts.CLIP_stop_at_last_layers = clip_skip
                embeddings, pooled = embedders["sdxl"](PROMPTS[case])
                tensors[f"sdxl/{case}/sdxl_clip_l_skip_{clip_skip}/embeddings"] = embeddings.contiguous()
                tensors[f"sdxl/{case}/sdxl_clip_l_skip_{clip_skip}/pooled"] = pooled.contiguous()
        opts.sdxl_clip_l_skip = False
    opts.CLIP_stop_at_last_layers = 1

    commit = subprocess.run(["git", "-C", args.webui, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    from importlib.metadata import version

    metadata = {
        "prompts": json.dumps(PROMPTS),
        "webui_commit": commit.strip() or "unknown",
        "packages": json.dumps(
            {name: version(name) for name in ("transformers", "open-clip-torch", "lark", "ftfy", "torch")}
        ),
        "opts": json.dumps(OPTS),
    }
    save_file(tensors, os.path.join(args.output_dir, "fixtures.safetensors"), metadata=metadata)
    save_file(state, os.path.join(args.output_dir, "encoders.safetensors"), metadata={"configs": json.dumps(configs)})
    os.remove(bpe)
    print(f"wrote {len(tensors)} tensors for {len(PROMPTS)} prompts and 3 families to {args.output_dir}")


if __name__ == "__main__":
    main()
