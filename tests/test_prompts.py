"""Text conditioning against the webui's own code: tests/data/webui_prompts/ holds what the webui's
sd_hijack_clip.py, sd_hijack_open_clip.py and prompt_parser.py computed on small text encoders (see its README)."""

import json
import os

import pytest
import torch
from helpers import ROOT
from safetensors import safe_open

from hypernet.errors import UsageError
from hypernet.prompts import PromptEncoder, encode_prompts, parse_emphasis

FIXTURES = os.path.join(ROOT, "tests", "data", "webui_prompts")
FAMILIES = ("sd1", "sd2", "sdxl")


@pytest.fixture(scope="module")
def fixtures():
    return safe_open(os.path.join(FIXTURES, "fixtures.safetensors"), "pt")


@pytest.fixture(scope="module")
def prompts(fixtures):
    return json.loads(fixtures.metadata()["prompts"])


def tokenizer(open_clip):
    """The fixtures' character-level tokenizer; OpenCLIP's pads with '!' (id 0), as diffusers' SD 2.x and SDXL
    folders have it."""
    from transformers import CLIPTokenizer

    folder = os.path.join(FIXTURES, "tokenizer")
    extra = {"pad_token": "!"} if open_clip else {}
    return CLIPTokenizer(
        os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=77, **extra
    )


@pytest.fixture(scope="module")
def encoders():
    """{family: (tokenizers, text encoders)} with the fixtures' weights."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    path = os.path.join(FIXTURES, "encoders.safetensors")
    with safe_open(path, "pt") as f:
        configs = json.loads(f.metadata()["configs"])
        state = {key: f.get_tensor(key) for key in f.keys()}
    models = {}
    for name, config in configs.items():
        cls = CLIPTextModelWithProjection if name == "sdxl_2" else CLIPTextModel
        model = cls(CLIPTextConfig(**config)).eval()
        own = {key.split("/", 1)[1]: value for key, value in state.items() if key.startswith(name + "/")}
        if not hasattr(model, "text_model"):  # transformers 5 dropped CLIPTextModel's text_model level
            own = {key.removeprefix("text_model."): value for key, value in own.items()}
        missing, unexpected = model.load_state_dict(own, strict=False)
        assert not unexpected and all("position_ids" in key for key in missing), (missing, unexpected)
        models[name] = model
    return {
        "sd1": ([tokenizer(False)], [models["sd1"]]),
        "sd2": ([tokenizer(True)], [models["sd2"]]),
        "sdxl": ([tokenizer(False), tokenizer(True)], [models["sdxl_1"], models["sdxl_2"]]),
    }


def fixture_cases(fixtures):
    return sorted({tuple(key.split("/")[:3]) for key in fixtures.keys()})


def test_fixtures_cover_the_issue(fixtures, prompts):
    cases = fixture_cases(fixtures)
    for family in FAMILIES:
        for clip_skip in (1, 2):
            assert (family, "short", f"clip_skip_{clip_skip}") in cases
    for needed in (
        "tokens_75",
        "tokens_76",
        "tokens_200",
        "comma_near_split",
        "emphasis_weight",
        "escapes",
        "break",
        "empty",
        "batch",
        "exclamation",
        "exclamation_mixed",
    ):
        assert needed in prompts
    assert all(("sdxl", "exclamation", f"sdxl_clip_l_skip_{n}") in cases for n in (1, 2, 3))
    assert any("!!!" in p for p in prompts["exclamation"]) and any("!?" in p for p in prompts["exclamation_mixed"])


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_prompts_equals_the_webui(family, fixtures, prompts, encoders):
    tokenizers, text_encoders = encoders[family]
    checked = 0
    for fam, case, skip in fixture_cases(fixtures):
        if fam != family:
            continue
        clip_skip = int(skip.rsplit("_", 1)[1])
        expected = fixtures.get_tensor(f"{family}/{case}/{skip}/embeddings")
        if skip.startswith("sdxl_clip_l_skip"):  # the webui's "Clip skip SDXL" setting on
            encoder = PromptEncoder(tokenizers, text_encoders, clip_skip, sdxl_clip_l_skip=True)
            embeddings, pooled = encoder(prompts[case])
        else:
            embeddings, pooled = encode_prompts(prompts[case], tokenizers, text_encoders, clip_skip=clip_skip)
        assert embeddings.shape == expected.shape, (case, skip)
        torch.testing.assert_close(embeddings, expected, atol=1e-5, rtol=0, msg=f"{family} {case} {skip}")
        if family == "sdxl":
            torch.testing.assert_close(
                pooled, fixtures.get_tensor(f"{family}/{case}/{skip}/pooled"), atol=1e-5, rtol=0
            )
        else:
            assert pooled is None
        checked += 1
    assert checked >= len(prompts)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_prompt_alone_equals_the_webui_on_one_prompt(family, fixtures, prompts, encoders):
    """each() is what the webui computes for every prompt alone (a generation's prompt, a fixed caption)."""
    tokenizers, text_encoders = encoders[family]
    singles = [case for case, texts in prompts.items() if len(texts) == 1]
    encoded = PromptEncoder(tokenizers, text_encoders).each([prompts[case][0] for case in singles])
    for case, (embedding, pooled) in zip(singles, encoded):
        expected = fixtures.get_tensor(f"{family}/{case}/clip_skip_1/embeddings")[0]
        torch.testing.assert_close(embedding, expected, atol=1e-5, rtol=0, msg=case)
        if family == "sdxl":
            torch.testing.assert_close(
                pooled, fixtures.get_tensor(f"{family}/{case}/clip_skip_1/pooled")[0], atol=1e-5, rtol=0
            )


def test_chunk_counts(prompts, encoders):
    encoder = PromptEncoder(*encoders["sd1"])
    counts = {case: encoder.chunk_count(prompts[case][0]) for case in prompts}
    assert counts["short"] == counts["empty"] == counts["tokens_75"] == 1
    assert counts["tokens_76"] == counts["break"] == 2
    assert counts["tokens_200"] == 3


def test_a_long_prompt_is_not_truncated(prompts, encoders):
    """The tokens past 75 change the context; the diffusers encoding cuts them off."""
    tokenizers, text_encoders = encoders["sd1"]
    long = prompts["tokens_200"][0]
    webui = PromptEncoder(tokenizers, text_encoders)([long, long[:-20]])[0]
    assert webui.shape[1] == 231 and not torch.allclose(webui[0, 154:], webui[1, 154:])
    diffusers = PromptEncoder(tokenizers, text_encoders, encoding="diffusers")([long, long[:-20]])[0]
    assert diffusers.shape[1] == 77 and torch.equal(diffusers[0], diffusers[1])


def test_comma_backtracking_moves_the_last_words(prompts, encoders):
    encoder = PromptEncoder(*encoders["sd1"])
    near = encoder.chunks(prompts["comma_near_split"][0])[0]
    comma = encoder.rules[0].comma
    assert near[0].ids[71] == comma and set(near[0].ids[72:]) == {encoder.rules[0].end}  # cut after the comma
    far = encoder.chunks(prompts["comma_far_from_split"][0])[0]
    assert far[0].ids[75] != encoder.rules[0].end  # no comma among the last 20 tokens: a full chunk


def test_parse_emphasis_matches_the_webui_doctests():
    assert parse_emphasis("normal text") == [("normal text", 1.0)]
    assert parse_emphasis("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert parse_emphasis("(unbalanced") == [("unbalanced", 1.1)]
    assert parse_emphasis(r"\(literal\]") == [("(literal]", 1.0)]
    assert parse_emphasis("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    assert parse_emphasis("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ("a ", 1.0),
        ("house", 1.5730000000000004),
        (" ", 1.1),
        ("on", 1.0),
        (" a ", 1.1),
        ("hill", 0.55),
        (", sun, ", 1.1),
        ("sky", 1.4641000000000006),
        (".", 1.1),
    ]
    assert parse_emphasis("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    assert parse_emphasis("(a: 1.5 )") == [("a", 1.5)]
    assert parse_emphasis("") == [("", 1.0)]


def test_bad_emphasis_weight_is_one_line(encoders):
    with pytest.raises(UsageError, match=r"emphasis weight '1\.2\.3' is not a number"):
        PromptEncoder(*encoders["sd1"]).chunks("(a:1.2.3)")


def test_clip_skip_out_of_range(encoders):
    with pytest.raises(UsageError, match="clip skip 4: the text encoder has 3 layers"):
        PromptEncoder(*encoders["sd1"], clip_skip=4)


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_encoding_equals_diffusers_pipelines(family, encoders, tmp_path):
    """encoding="diffusers" with clip skip N is diffusers' encode_prompt with clip_skip=N-1."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    tokenizers, text_encoders = encoders[family]
    prompts = ["a red circle", "(a teal square:1.3), " * 10]
    for clip_skip in (1, 2):
        ours, pooled = PromptEncoder(tokenizers, text_encoders, clip_skip, encoding="diffusers")(prompts)
        skip = clip_skip - 1 or None
        if family == "sdxl":
            pipe = StableDiffusionXLPipeline(
                vae=None,
                text_encoder=text_encoders[0],
                text_encoder_2=text_encoders[1],
                tokenizer=tokenizers[0],
                tokenizer_2=tokenizers[1],
                unet=None,
                scheduler=None,
            )
            theirs, _, their_pooled, _ = pipe.encode_prompt(
                prompts, device="cpu", do_classifier_free_guidance=False, clip_skip=skip
            )
            torch.testing.assert_close(pooled, their_pooled)
        else:
            pipe = StableDiffusionPipeline(
                vae=None,
                text_encoder=text_encoders[0],
                tokenizer=tokenizers[0],
                unet=None,
                scheduler=None,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
            try:
                theirs, _ = pipe.encode_prompt(prompts, "cpu", 1, False, clip_skip=skip)
            except AttributeError as e:  # diffusers reads text_encoder.text_model, which transformers 5 removed
                assert "text_model" in str(e) and skip
                ids = tokenizers[0](prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
                states = text_encoders[0](ids.input_ids, output_hidden_states=True).hidden_states[-(skip + 1)]
                theirs = text_encoders[0].final_layer_norm(states)  # what that code computes
        torch.testing.assert_close(ours, theirs)


def family_pipeline(family, request):
    from diffusers import DiffusionPipeline

    folder = request.getfixturevalue(
        {"sd1": "tiny_model_dir", "sd2": "sd2_model_dir", "sdxl": "sdxl_model_dir"}[family]
    )
    pipeline = DiffusionPipeline.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def pipeline_encoder(pipeline, **kwargs):
    tokenizers = [t for t in (pipeline.tokenizer, getattr(pipeline, "tokenizer_2", None)) if t is not None]
    encoders = [e for e in (pipeline.text_encoder, getattr(pipeline, "text_encoder_2", None)) if e is not None]
    return PromptEncoder(tokenizers, encoders, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_plain_short_prompt_generates_what_the_pipeline_generates(family, request):
    """Below 76 tokens and without emphasis, the webui's context is diffusers' own (SD 2.x and SDXL padding with '!'
    after the end token, SDXL zeros for an empty negative prompt), so the images are the pipeline's."""
    from hypernet.prompts import text_to_image

    pipeline = family_pipeline(family, request)
    encoder = pipeline_encoder(pipeline)
    for negative in ("", "blurry, dark"):
        common = dict(num_inference_steps=2, guidance_scale=5.0, width=64, height=64, output_type="np")
        ours = text_to_image(
            pipeline, encoder, "a red circle", negative, generator=torch.Generator().manual_seed(1), **common
        )
        theirs = pipeline(
            prompt="a red circle",
            negative_prompt=negative or None,
            generator=torch.Generator().manual_seed(1),
            **common,
        ).images
        assert abs(ours - theirs).max() < 1e-5, (family, negative)


def test_prompt_and_negative_of_different_lengths_are_each_attended_at_their_own(tiny_pipeline):
    from hypernet.prompts import unpadded_cross_attention

    unet = tiny_pipeline.unet
    generator = torch.Generator().manual_seed(0)
    short, long = torch.randn(1, 77, 96, generator=generator), torch.randn(1, 154, 96, generator=generator)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    padded = torch.cat([short, torch.randn(1, 77, 96, generator=generator)], dim=1)
    with torch.no_grad():
        apart = torch.cat([unet(latents[:1], 10, short).sample, unet(latents[1:], 10, long).sample])
        with unpadded_cross_attention(unet, (77, 154), images=1):
            together = unet(latents, 10, encoder_hidden_states=torch.cat([padded, long])).sample
        unmasked = unet(latents, 10, encoder_hidden_states=torch.cat([padded, long])).sample
    torch.testing.assert_close(together, apart, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmasked[:1], apart[:1], atol=1e-3), "the hook is gone after the block"


def test_openclip_reads_exclamation_marks_as_the_webuis_openclip_tokenizer_does():
    """diffusers' SD 2.x and SDXL tokenizers hold '!' as their padding token; OpenCLIP's own tokenizer, which the
    webui uses for those encoders, reads it as text (webui_prompts/openclip_ids.json, made by OpenCLIP itself)."""
    from hypernet.prompts import normalize_text, token_ids

    with open(os.path.join(FIXTURES, "openclip_ids.json"), encoding="utf-8") as f:
        expected = json.load(f)
    open_clip = tokenizer(True)
    assert open_clip.pad_token == "!" and open_clip.pad_token_id == 0
    prompts = list(expected)
    assert token_ids(open_clip, [normalize_text(p, True) for p in prompts], True) == [expected[p] for p in prompts]
    assert expected["wow!"][-1] != 0, "'!' at a word's end is its own token, not the padding id"
