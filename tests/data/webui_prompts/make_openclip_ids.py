"""Token ids of prompts with '!' as OpenCLIP's own tokenizer gives them (see README.md beside this file).

    python make_openclip_ids.py

Run it in an environment with open-clip-torch 2.20.0 (the webui's pin) and ftfy; nothing of hypernet is imported.
The webui's OpenCLIP wrappers (modules/sd_hijack_open_clip.py) tokenize each piece of a prompt with
`open_clip.tokenizer`'s SimpleTokenizer `encode`; this runs that tokenizer with the fixtures' character-level bpe
file (as make_fixtures.py writes it) and writes the ids of every prompt in PROMPTS to openclip_ids.json.
"""

import gzip
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))

PROMPTS = [
    "wow!",
    "a red circle!!!",
    "what!? a cat",
    "!",
    "(>_<)! kaomoji",
    "1girl, !, !?, smile",
    "a <|endoftext|> b!",
    "Exclamation!  Marks!",
]


def main():
    import open_clip.tokenizer as oc

    bpe = os.path.join(HERE, "openclip_bpe.txt.gz")  # as make_fixtures.py writes it: the vocabulary, no merges
    with gzip.open(bpe, "wb") as f:
        f.write(b"#version: 0.2")
    tokenizer = oc.SimpleTokenizer(bpe)
    ids = {prompt: tokenizer.encode(prompt) for prompt in PROMPTS}
    with open(os.path.join(HERE, "openclip_ids.json"), "w", encoding="utf-8") as f:
        json.dump(ids, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
