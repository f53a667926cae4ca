"""The webui's prompt syntax: <hypernet:NAME:STRENGTH> (NAME looked up in one folder), and its text conditioning
(emphasis, BREAK, prompts of any length, Clip skip) as PromptEncoder and encode_prompts."""

import functools
import json
import logging
import os
import re
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ArgumentError, UsageError
from .flags import MULTIPLIER

logger = logging.getLogger(__name__)

PROMPT_HYPERNET = re.compile(r"<hypernet:([^:>]+)(?::([^>]*))?>")
# Bounds on what one prompt may ask for, so that memory and time do not grow with a prompt from someone else: tags
# (each applies a hypernetwork to every attention layer), characters, and 77-token chunks of its context.
MAX_PROMPT_TAGS = 32
MAX_PROMPT_CHARACTERS = 100_000
MAX_CHUNKS = 100


def parse_multiplier(text, where, example="NAME:0.8"):
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{where}: the multiplier after ':' must be a number, as in {example}") from None
    if not MULTIPLIER.allows(value):
        raise UsageError(f"{where}: the multiplier {MULTIPLIER.describe()}")
    return value


def hypernetworks_in(directory):
    """{name: path} of the hypernetwork files directly inside a folder, by stem, as the webui lists them (.pt first)."""
    if not os.path.isdir(directory):
        return {}
    found = {}
    for suffix in (".safetensors", ".pt"):
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if name.lower().endswith(suffix) and not name.startswith(".") and os.path.isfile(path):
                found[name[: -len(suffix)]] = path
    return found


def check_prompts(prompts):
    """A non-empty list of prompts, each a str (a str itself would be encoded character by character)."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise ArgumentError("prompts", f"{type(prompts).__name__}: give a list of prompts, e.g. [{prompts!r:.40}]")
    if not prompts:
        raise ArgumentError("prompts", "[]: give at least one prompt")
    if not all(isinstance(prompt, str) for prompt in prompts):
        raise ArgumentError("prompts", f"{[type(p).__name__ for p in prompts][:8]}: every prompt must be a str")


def check_prompt_length(prompt):
    if len(prompt) > MAX_PROMPT_CHARACTERS:
        raise UsageError(
            f"prompt {prompt[:60]!r}: {len(prompt):,} characters, more than {MAX_PROMPT_CHARACTERS:,}; shorten it"
        )


def parse_prompt(prompt, hypernetwork_dir, available=None):
    """Remove <hypernet:NAME:M> tags from a prompt; return (clean prompt, [(path, multiplier), ...]). NAME is looked up
    only among the files directly inside hypernetwork_dir, never as a path, as the webui looks it up."""
    available = hypernetworks_in(hypernetwork_dir) if available is None else available
    check_prompt_length(prompt)
    tags = PROMPT_HYPERNET.findall(prompt)
    if len(tags) > MAX_PROMPT_TAGS:
        raise UsageError(
            f"prompt {prompt[:60]!r}: {len(tags)} <hypernet:...> tags, more than {MAX_PROMPT_TAGS}; stack fewer"
        )
    found = []
    for name, multiplier in tags:
        tag = f"<hypernet:{name}{':' + multiplier if multiplier else ''}>"
        value = parse_multiplier(multiplier, f"prompt tag {tag}") if multiplier else 1.0
        if name not in available:
            names = ", ".join(sorted(available)[:20]) or "none"
            raise UsageError(f"prompt tag {tag}: no hypernetwork {name!r} in {hypernetwork_dir} (it has: {names})")
        found.append((available[name], value))
    clean = re.sub(r"\s{2,}", " ", PROMPT_HYPERNET.sub("", prompt)).strip(" ,")
    return clean, found


# -- text conditioning as the webui computes it --------------------------------------------------------------------
#
# The webui (modules/sd_hijack_clip.py, sd_hijack_open_clip.py, prompt_parser.py, sd_emphasis.py) parses emphasis
# and BREAK, tokenizes each parsed piece on its own, cuts the tokens into chunks of 75 (moving a cut back to a comma
# at most 20 tokens before it), wraps each chunk in its start and end tokens padded to 77, encodes every chunk, scales
# each token's embedding by its weight and the chunk back to its mean, and joins the chunks (77, 154, 231... tokens).

CHUNK_TOKENS = 75
COMMA_BACKTRACK = 20  # the webui's "Prompt word wrap length limit" (comma_padding_backtrack), at its default
BREAK = ("BREAK", -1.0)
# The largest emphasis weight of a piece of a prompt: beyond it a context overflows half precision (and the webui's
# mean restoring turns it into NaN, a black image), so no such weight is meant: (a:1e38), 1000 nested brackets.
MAX_EMPHASIS = 100.0
TEXT_ENCODINGS = ("webui", "diffusers")

EMPHASIS_TOKEN = re.compile(
    r"""
    \\(?P<escaped>[()\[\]\\])?            # \( \) \[ \] \\ stand for the character; a lone backslash for nothing
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)    # closes a ( with an explicit weight
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+ | :)
    """,
    re.X,
)
BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_emphasis(prompt):
    """The webui's emphasis syntax (prompt_parser.parse_prompt_attention): [(text, weight), ...] with '(a)' x1.1,
    '[a]' /1.1, '(a:1.3)' x1.3, escapes, brackets left open applying to the end, BREAK as ("BREAK", -1.0), and
    neighbours of equal weight joined."""
    check_prompt_length(prompt)
    pieces, rounds, squares = [], [], []

    def scale(start, factor):
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in EMPHASIS_TOKEN.finditer(prompt):
        token = match.group(0)
        if token.startswith("\\"):
            pieces.append([match.group("escaped") or "", 1.0])
        elif match.group("open"):
            (rounds if token == "(" else squares).append(len(pieces))
        elif match.group("weight") is not None and rounds:
            try:
                factor = float(match.group("weight"))
            except ValueError:
                raise UsageError(
                    f"prompt {prompt[:60]!r}: emphasis weight {match.group('weight')!r} is not a number"
                ) from None
            scale(rounds.pop(), factor)
        elif token == ")" and rounds:
            scale(rounds.pop(), 1.1)
        elif token == "]" and squares:
            scale(squares.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(BREAK_WORD.split(token)):
                if i:
                    pieces.append(list(BREAK))
                pieces.append([part, 1.0])
    for start in rounds:
        scale(start, 1.1)
    for start in squares:
        scale(start, 1 / 1.1)
    merged = []
    for text, weight in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    for text, weight in merged:
        if not abs(weight) <= MAX_EMPHASIS:
            raise UsageError(
                f"prompt {prompt[:60]!r}: {text.strip()[:30]!r} has the emphasis weight {weight:.4g}, beyond "
                f"{MAX_EMPHASIS:g} either way: no such weight can be meant; lower its brackets' weight or count"
            )
    return [tuple(piece) for piece in merged]


@dataclass(frozen=True)
class Chunk:
    """77 token ids and their weights: start, 75 tokens of the prompt (padded with the end token), end."""

    ids: tuple
    weights: tuple


@dataclass(frozen=True)
class EncoderRules:
    """How the webui tokenizes and reads one text encoder. OpenCLIP encoders (SD 2.x; SDXL's second) are told by their
    padding token, which is not their end token ('!', id 0, in diffusers' folders): the webui pads them with it after
    the first end token, unescapes HTML entities as OpenCLIP's tokenizer does, and ignores Clip skip."""

    start: int
    end: int
    pad: int
    comma: int
    open_clip: bool
    layers: int

    @classmethod
    def of(cls, tokenizer, text_encoder):
        comma = tokenizer.convert_tokens_to_ids(",</w>")
        return cls(
            start=tokenizer.bos_token_id,
            end=tokenizer.eos_token_id,
            pad=tokenizer.pad_token_id,
            comma=-1 if comma in (None, tokenizer.unk_token_id) else comma,
            open_clip=tokenizer.pad_token_id != tokenizer.eos_token_id,
            layers=text_encoder.config.num_hidden_layers,
        )


def split_chunks(pieces, ids_per_piece, rules):
    """The webui's tokenize_line: the prompt's tokens in chunks of 75, a chunk closed early at BREAK or, when the
    75th token is not a comma, after the last comma among the last 20 tokens."""
    chunks, ids, weights, last_comma = [], [], [], -1

    def close():
        nonlocal ids, weights, last_comma
        pad = CHUNK_TOKENS - len(ids)
        chunks.append(Chunk((rules.start, *ids, *[rules.end] * pad, rules.end), (1.0, *weights, *[1.0] * pad, 1.0)))
        ids, weights, last_comma = [], [], -1

    for (text, weight), piece_ids in zip(pieces, ids_per_piece):
        if (text, weight) == BREAK:
            close()
            continue
        for token in piece_ids:
            if token == rules.comma:
                last_comma = len(ids)
            elif len(ids) == CHUNK_TOKENS and last_comma != -1 and len(ids) - last_comma <= COMMA_BACKTRACK:
                moved_ids, moved_weights = ids[last_comma + 1 :], weights[last_comma + 1 :]
                ids, weights = ids[: last_comma + 1], weights[: last_comma + 1]
                close()
                ids, weights = moved_ids, moved_weights
            if len(ids) == CHUNK_TOKENS:
                close()
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close()
    return chunks


def empty_chunk(rules):
    return Chunk((rules.start, *[rules.end] * (CHUNK_TOKENS + 1)), (1.0,) * (CHUNK_TOKENS + 2))


def normalize_text(text, open_clip):
    """What the webui's tokenizers do to text before they split it: ftfy's fixes (curly quotes, ligatures, width,
    mojibake) and, in OpenCLIP's, HTML entities unescaped twice."""
    import html

    import ftfy

    text = ftfy.fix_text(text)
    return html.unescape(html.unescape(text)).strip() if open_clip else text


# OpenCLIP's tokenizer (open_clip.tokenizer.SimpleTokenizer, the webui's for SD 2.x and SDXL's second encoder):
# its split of the cleaned, lower-cased text, and its start and end tokens' texts.
OPEN_CLIP_SPLIT = r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


def token_ids(tokenizer, texts, open_clip):
    """Each text's token ids, as the webui's tokenizer of that encoder gives them: transformers' CLIPTokenizer for
    CLIP; OpenCLIP's own tokenizer for OpenCLIP, which reads '!' as text (diffusers' SD 2.x and SDXL tokenizers hold
    '!' as their padding token, so transformers would read every '!' of a prompt as padding, id 0): OpenCLIP's split
    and the tokenizer's BPE, with no added token matched."""
    if not open_clip:
        return tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False).input_ids
    return [open_clip_ids(tokenizer, text) for text in texts]


@functools.cache
def byte_encoder():
    """CLIP's and OpenCLIP's bytes_to_unicode: each byte's printable stand-in, as their BPE vocabularies spell bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def open_clip_ids(tokenizer, text):
    """OpenCLIP's encode() of text that normalize_text has cleaned: whitespace collapsed, lower case, its split, each
    piece's bytes through the BPE of `tokenizer`."""
    import regex

    backend = getattr(tokenizer, "backend_tokenizer", None)
    encoder = byte_encoder()
    ids = []
    for piece in regex.findall(OPEN_CLIP_SPLIT, re.sub(r"\s+", " ", text).strip().lower(), flags=regex.IGNORECASE):
        if piece in ("<start_of_text>", "<end_of_text>"):
            ids.append(tokenizer.bos_token_id if piece == "<start_of_text>" else tokenizer.eos_token_id)
            continue
        spelled = "".join(encoder[b] for b in piece.encode("utf-8"))
        if backend is not None:
            ids += [token.id for token in backend.model.tokenize(spelled)]
        else:  # a slow (Python) tokenizer
            ids += tokenizer.convert_tokens_to_ids(tokenizer.bpe(spelled).split(" "))
    return ids


class PromptEncoder:
    """Prompts to the context a UNet's cross-attention reads, for SD 1.x, SD 2.x and SDXL.

    encoding="webui" computes what the webui computes (any length, emphasis, BREAK, Clip skip as the webui numbers
    it: 1 is the last layer, 2 the one before; the webui ignores it for SD 2.x and SDXL, and so does this).
    encoding="diffusers" computes what diffusers' pipelines compute with clip_skip=N-1: the prompt as plain text,
    cut at 77 tokens.
    """

    def __init__(self, tokenizers, text_encoders, clip_skip=1, encoding="webui", sdxl_clip_l_skip=False):
        if encoding not in TEXT_ENCODINGS:
            raise UsageError(f"text encoding {encoding!r}: use one of {', '.join(TEXT_ENCODINGS)}")
        self.tokenizers, self.text_encoders = list(tokenizers), list(text_encoders)
        self.rules = [EncoderRules.of(t, e) for t, e in zip(self.tokenizers, self.text_encoders)]
        self.sdxl = len(self.text_encoders) == 2
        self.clip_skip, self.encoding = clip_skip, encoding
        self.sdxl_clip_l_skip = sdxl_clip_l_skip and self.sdxl  # the webui's "Clip skip SDXL" setting
        self._empty = None
        layers = min(rules.layers for rules in self.rules)
        if not 1 <= clip_skip <= layers:
            raise UsageError(f"clip skip {clip_skip}: the text encoder has {layers} layers; use 1 to {layers}")

    @property
    def clip_skip_applies(self):
        """Whether clip skip changes anything: the webui applies it to SD 1.x only, diffusers to every family."""
        return self.encoding == "diffusers" or self.sdxl_clip_l_skip or not (self.sdxl or self.rules[0].open_clip)

    def chunks(self, prompt):
        """Per text encoder, the prompt's chunks (webui encoding; the diffusers encoding has one chunk)."""
        pieces = parse_emphasis(prompt)
        result = []
        for tokenizer, rules in zip(self.tokenizers, self.rules):
            texts = [normalize_text(text, rules.open_clip) for text, _ in pieces]
            result.append(split_chunks(pieces, token_ids(tokenizer, texts, rules.open_clip), rules))
        if len(result[0]) > MAX_CHUNKS:
            raise UsageError(
                f"prompt {prompt[:60]!r}: {len(result[0])} chunks of 75 tokens, more than {MAX_CHUNKS}; shorten it"
            )
        if len({len(c) for c in result}) > 1:
            raise UsageError(
                f"prompt {prompt[:60]!r}: the two text encoders' tokenizers cut it into {len(result[0])} and "
                f"{len(result[1])} chunks (HTML entities?); the webui cannot encode it either"
            )
        return result

    def chunk_count(self, prompt):
        """How many 77-token chunks the prompt's context has."""
        return 1 if self.encoding == "diffusers" else len(self.chunks(prompt)[0])

    def token_count(self, prompt, literal=False):
        """The prompt's tokens (no start, end or padding) in the longest of its encoders' tokenizations; literal:
        with brackets, weights and BREAK read as plain text."""
        pieces = [(prompt, 1.0)] if literal else [p for p in parse_emphasis(prompt) if p != BREAK]
        counts = []
        for tokenizer, rules in zip(self.tokenizers, self.rules):
            texts = [normalize_text(text, rules.open_clip) for text, _ in pieces]
            counts.append(sum(len(i) for i in token_ids(tokenizer, texts, rules.open_clip)))
        return max(counts)

    def padded(self, prompts, chunks):
        """(embeddings (batch, 77 * chunks, width), pooled or None): each prompt as each() encodes it, padded with
        empty chunks to `chunks` (as the webui pads the shorter prompts of a batch), or cut to it with a warning."""
        contexts, pooled = [], []
        for prompt, (embedding, prompt_pooled) in zip(prompts, self.each(prompts)):
            have = embedding.shape[0] // (CHUNK_TOKENS + 2)
            if have > chunks:
                logger.warning(
                    f"prompt {prompt[:60]!r}: {have} chunks, more than this batch's {chunks}; cut to {chunks}"
                )
                embedding = embedding[: chunks * (CHUNK_TOKENS + 2)]
            elif have < chunks:
                embedding = torch.cat([embedding, self.empty_context().repeat(chunks - have, 1)])
            contexts.append(embedding)
            pooled.append(prompt_pooled)
        return torch.stack(contexts), None if pooled[0] is None else torch.stack(pooled)

    @torch.no_grad()
    def empty_context(self):
        """The context of an empty chunk (77, width), as each() encodes it alone."""
        if self._empty is None:
            states = [self._encode_rows(e, [empty_chunk(rules)])[0][0] for e, rules in enumerate(self.rules)]
            self._empty = torch.cat(states, dim=-1)
        return self._empty

    @torch.no_grad()
    def __call__(self, prompts):
        """(embeddings, pooled or None) of a batch, as the webui encodes a batch (its cond_stage_model(prompts)):
        embeddings (batch, 77 * k, width), k the most chunks of any prompt, shorter ones padded with empty chunks;
        each chunk's emphasis restores the mean of that chunk across the batch. pooled: SDXL's second encoder's
        pooled output of each prompt's first chunk."""
        check_prompts(prompts)
        if self.encoding == "diffusers":
            return self._diffusers(prompts)
        per_prompt = [self.chunks(p) for p in prompts]
        count = max(len(chunks[0]) for chunks in per_prompt)
        embeddings, pooled = [], None
        for e, rules in enumerate(self.rules):
            rows = [
                chunks[e][i] if i < len(chunks[e]) else empty_chunk(rules)
                for i in range(count)
                for chunks in per_prompt
            ]
            states, rows_pooled = self._encode_rows(e, rows)
            states = states.reshape(count, len(prompts), *states.shape[1:])
            weights = self._weights(rows, states.device).view(count, len(prompts), -1)
            chunks = [emphasize(states[i], weights[i]) for i in range(count)]
            embeddings.append(torch.cat(chunks, dim=1))
            if rows_pooled is not None:
                pooled = rows_pooled[: len(prompts)]
        return torch.cat(embeddings, dim=-1), pooled

    @torch.no_grad()
    def each(self, prompts):
        """[(embedding (77 * k, width), pooled or None)]: each prompt as the webui encodes it alone, the way it
        encodes a prompt to generate with and a fixed caption to train on; batched for speed."""
        check_prompts(prompts)
        if self.encoding == "diffusers":
            embeddings, pooled = self._diffusers(prompts)
            return [(embeddings[i], None if pooled is None else pooled[i]) for i in range(len(prompts))]
        per_prompt = [self.chunks(p) for p in prompts]
        counts = [len(chunks[0]) for chunks in per_prompt]
        starts = [sum(counts[:i]) for i in range(len(prompts))]
        parts, pooled = [], None
        for e in range(len(self.rules)):
            rows = [chunk for chunks in per_prompt for chunk in chunks[e]]
            states, rows_pooled = self._encode_rows(e, rows)
            weights = self._weights(rows, states.device)
            chunks = [emphasize(states[r : r + 1], weights[r : r + 1])[0] for r in range(len(rows))]
            parts.append([torch.cat(chunks[s : s + n]) for s, n in zip(starts, counts)])
            if rows_pooled is not None:
                pooled = [rows_pooled[s] for s in starts]
        embeddings = [torch.cat(per_encoder, dim=-1) for per_encoder in zip(*parts)]
        return [(embedding, None if pooled is None else pooled[i]) for i, embedding in enumerate(embeddings)]

    def _weights(self, rows, device):
        return torch.tensor([row.weights for row in rows], dtype=torch.float32, device=device)

    def _encode_rows(self, e, rows):
        """The hidden states (rows, 77, width) in float32 of encoder e for chunks, and its pooled output or None."""
        rules, encoder = self.rules[e], self.text_encoders[e]
        ids = torch.tensor([row.ids for row in rows], device=encoder.device)
        if rules.open_clip:  # the webui pads OpenCLIP after the first end token with its padding token
            after_end = torch.cumsum((ids == rules.end).int(), dim=1) - (ids == rules.end).int() > 0
            ids = ids.masked_fill(after_end, rules.pad)
        return self._hidden_states(e, ids)

    def _hidden_states(self, e, ids):
        encoder = self.text_encoders[e]
        output = encoder(ids, output_hidden_states=True)
        pooled = output.text_embeds.float() if hasattr(output, "text_embeds") and self.sdxl else None
        if self.sdxl:
            if e == 0 and self.sdxl_clip_l_skip and self.encoding == "webui":
                # the webui's "Clip skip SDXL": CLIP-L's hidden state Clip skip layers from the end, not normed
                return output.hidden_states[-self.clip_skip].float(), pooled
            skip = self.clip_skip if self.encoding == "diffusers" else 1
            return output.hidden_states[-(skip + 1)].float(), pooled
        if self.clip_skip > 1 and self.clip_skip_applies:
            # transformers 5's CLIPTextModel holds the final layer norm itself, earlier ones in text_model
            final_layer_norm = getattr(encoder, "text_model", encoder).final_layer_norm
            states = final_layer_norm(output.hidden_states[-self.clip_skip])
        else:
            states = output.last_hidden_state
        return states.float(), pooled

    def _diffusers(self, prompts):
        embeddings, pooled = [], None
        for e, tokenizer in enumerate(self.tokenizers):
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            states, rows_pooled = self._hidden_states(e, ids.to(self.text_encoders[e].device))
            embeddings.append(states)
            pooled = rows_pooled if rows_pooled is not None else pooled
        return torch.cat(embeddings, dim=-1), pooled


def emphasize(states, weights):
    """The webui's "Original" emphasis: every token's embedding times its weight, then all of them scaled so that
    their mean is the mean before. Where every weight is 1 this is the identity, bit for bit, and is skipped: the
    webui's division gives 0/0 for a chunk whose mean is exactly 0."""
    if bool((weights == 1).all()):
        return states
    original = states.mean()
    scaled = states * weights.unsqueeze(-1)
    return scaled * (original / scaled.mean())


def encode_prompts(prompts, tokenizers, text_encoders, clip_skip=1):
    """(embeddings, pooled) the webui computes for a batch of prompts: embeddings (batch, 77 * k, width), k the most
    chunks of any prompt; pooled None for SD 1.x and 2.x, SDXL's second encoder's pooled output of the first chunk.
    Clip skip as the webui numbers it (1: the last layer; ignored for SD 2.x and SDXL, as the webui ignores it)."""
    return PromptEncoder(tokenizers, text_encoders, clip_skip)(prompts)


def check_clip_skip(clip_skip, folder):
    """clip_skip from 1 to the layers of the text encoder of a diffusers folder (read from its config alone)."""
    try:
        with open(os.path.join(folder, "text_encoder", "config.json")) as f:
            layers = int(json.load(f)["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        layers = None
    if clip_skip < 1 or (layers is not None and clip_skip > layers):
        raise ArgumentError(
            "clip_skip", f"{clip_skip}: use 1 to {layers or 'the text encoder layers'} (1: the last layer)"
        )


def pipeline_conditioning(encoder, prompt, negative_prompt=""):
    """(kwargs, lengths) for a diffusers text-to-image pipeline: prompt_embeds and negative_prompt_embeds of one prompt
    and its negative as `encoder` encodes each alone (SDXL: the pooled ones too; an empty negative prompt as zeros,
    as the webui and diffusers' SDXL pipeline make it), the shorter padded with empty chunks to the other's length;
    lengths: (negative tokens, prompt tokens) before that padding, for unpadded_cross_attention."""
    (positive, pooled), (negative, negative_pooled) = encoder.each([prompt, negative_prompt])
    if encoder.sdxl and not negative_prompt:
        negative, negative_pooled = torch.zeros_like(negative), torch.zeros_like(negative_pooled)
    lengths = (negative.shape[0], positive.shape[0])
    tokens = max(lengths)
    empty = encoder.empty_context().to(positive.device)

    def pad(context, filler):
        return torch.cat([context, filler.repeat((tokens - context.shape[0]) // filler.shape[0], 1)])[None]

    zeros = encoder.sdxl and not negative_prompt
    kwargs = {
        "prompt_embeds": pad(positive, empty),
        "negative_prompt_embeds": pad(negative, torch.zeros_like(empty) if zeros else empty),
    }
    if encoder.sdxl:
        kwargs.update(pooled_prompt_embeds=pooled[None], negative_pooled_prompt_embeds=negative_pooled[None])
    return kwargs, lengths


class unpadded_cross_attention:
    """While in effect, the UNet's cross-attention reads the negative and the positive halves of a classifier-free
    guidance batch (negatives first, as diffusers' pipelines join them) each up to its own prompt's length, and the
    padding past it not at all: what the webui computes by default when the two differ in length, running them
    apart. `images` is the number of images a call makes (each half's rows)."""

    def __init__(self, unet, lengths, images):
        self.unet, self.lengths, self.images, self.handle = unet, lengths, images, None

    def __enter__(self):
        if self.lengths[0] != self.lengths[1]:
            self.handle = self.unet.register_forward_pre_hook(self.hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.remove()

    def hook(self, module, args, kwargs):
        states = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[2]
        rows, tokens = states.shape[:2]
        halves = [self.lengths[0]] * self.images + [self.lengths[1]] * self.images
        lengths = halves if rows == len(halves) else [self.lengths[1]] * rows  # without guidance: positives alone
        mask = torch.arange(tokens, device=states.device)[None] < torch.tensor(lengths, device=states.device)[:, None]
        kwargs["encoder_attention_mask"] = mask.to(states.dtype)
        return args, kwargs


def text_to_image(pipeline, encoder, prompt, negative_prompt="", num_images_per_prompt=1, **kwargs):
    """The images of a diffusers text-to-image pipeline (SD 1.x, 2.x, SDXL) for one prompt, with the prompt and the
    negative prompt encoded by `encoder`, each at its own length (pipeline_conditioning, unpadded_cross_attention):
    PIL images, or with output_type="np" an array. An image that turned NaN or infinite is an error, never returned."""
    conditioning, lengths = pipeline_conditioning(encoder, prompt, negative_prompt)
    output_type = kwargs.pop("output_type", "pil")
    with unpadded_cross_attention(pipeline.unet, lengths, num_images_per_prompt):
        images = pipeline(**conditioning, num_images_per_prompt=num_images_per_prompt, output_type="np", **kwargs)
    if not np.isfinite(images.images).all():  # where the webui stops with "A tensor with all NaNs was produced"
        raise UsageError(
            f"prompt {prompt[:60]!r}: the image turned NaN or infinite while it was generated, and was not written; "
            "lower the guidance scale or the prompt's emphasis weights, or generate in float32"
        )
    return images.images if output_type == "np" else pipeline.image_processor.numpy_to_pil(images.images)
