"""The style measure: the sliced Wasserstein distance between colour distributions, against its formula."""

import numpy as np
import pytest
from PIL import Image

from hypernet.evaluation import DIRECTIONS, colour_distance, colour_quantiles

CREAM, TEAL, GRAY = (246, 232, 200), (0, 128, 128), (128, 128, 128)


def flat(colour, size=(16, 16)):
    return Image.new("RGB", size, colour)


def test_flat_images_are_the_mean_projected_distance_of_their_colours_apart():
    expected = np.abs((np.subtract(GRAY, CREAM)) @ DIRECTIONS.T).mean()
    assert colour_distance(flat(GRAY), [flat(CREAM)]) == pytest.approx(expected)
    assert colour_distance(flat(CREAM), [flat(CREAM), flat(CREAM, (4, 4))]) == 0.0


def test_the_arrangement_of_pixels_does_not_matter_their_proportions_do():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    shuffled = rng.permutation(pixels.reshape(-1, 3)).reshape(32, 32, 3)
    assert colour_distance(Image.fromarray(pixels), [Image.fromarray(shuffled)]) == pytest.approx(0.0, abs=1e-9)
    half = np.zeros((16, 16, 3), dtype=np.uint8)
    half[:, :8], half[:, 8:] = CREAM, TEAL
    # half the mass has to move from teal to cream, so half the flat distance
    full = colour_distance(flat(TEAL), [flat(CREAM)])
    assert colour_distance(Image.fromarray(half), [flat(CREAM)]) == pytest.approx(full / 2, rel=0.02)


def test_reference_quantiles_are_reused_and_any_image_mode_is_read():
    reference = colour_quantiles([flat(CREAM), flat(TEAL)])
    assert reference.shape == (256, len(DIRECTIONS))
    image = flat(GRAY)
    assert colour_distance(image, reference) == colour_distance(image, [flat(CREAM), flat(TEAL)])
    assert colour_distance(Image.new("RGBA", (4, 4), TEAL + (0,)), [flat(TEAL)]) == 0.0
    assert colour_distance(Image.new("L", (4, 4), 128), [flat(GRAY)]) == 0.0


@pytest.mark.slow
def test_before_after_pairs_generated_images_by_prompt_and_seed_and_reports_their_style(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from helpers import ROOT

    import hypernet

    demo = os.path.join(ROOT, "examples", "demo-sd")
    network = hypernet.Hypernetwork([32, 64, 96], name="check")
    hypernet.save(network, tmp_path / "check.pt")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a teal star in the middle, art by check\na red square at the bottom, art by check\n")
    for multiplier in (0, 1):
        subprocess.run(
            [
                sys.executable,
                "generate.py",
                "--pretrained_model_name_or_path",
                demo,
                "--prompts_file",
                str(prompts),
                "--hypernetwork",
                f"{tmp_path / 'check.pt'}:{multiplier}",
                "--seed",
                "3",
                "--num_images",
                "2",
                "--num_inference_steps",
                "4",
                "--no_progress",
                "--output_dir",
                str(tmp_path / f"s{multiplier}"),
            ],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
    out = tmp_path / "grid.png"
    result = subprocess.run(
        [
            sys.executable,
            "examples/before_after.py",
            str(tmp_path / "s0"),
            str(tmp_path / "s1"),
            "--train_data_dir",
            "examples/style_dataset",
            "--output",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "prompts in the training captions:" in result.stdout and "each of the 24 training images:" in result.stdout
    assert Image.open(out).size == (260 + 2 * (2 * 128 + 8), 20 + 2 * (128 + 14))  # a figure under each image
    report = json.loads((tmp_path / "grid.json").read_text())
    images = {(r["prompt"].split(",")[0], r["seed"], r["multiplier"]): r for r in report["images"]}
    # generate.py numbers seeds on across prompts: the first prompt gets 3 and 4, the second 5 and 6
    assert set(images) == {
        (p, s, k)
        for p, seeds in (("a teal star in the middle", (3, 4)), ("a red square at the bottom", (5, 6)))
        for s in seeds
        for k in (0.0, 1.0)
    }
    names = sorted(n for n in os.listdir(os.path.join(ROOT, "examples", "style_dataset")) if n.endswith(".png"))
    training = [
        Image.open(os.path.join(ROOT, "examples", "style_dataset", n)).convert("RGB").resize((64, 64), Image.LANCZOS)
        for n in names
    ]
    for folder, multiplier in (("s0", 0.0), ("s1", 1.0)):
        for name in os.listdir(tmp_path / folder):
            if name.endswith(".png") and not name.startswith("grid-"):
                image = Image.open(tmp_path / folder / name)
                prompt, seed = image.info["parameters"].split(",")[0], int(name.split("-")[1].split(".")[0])
                assert images[prompt, seed, multiplier]["style"] == pytest.approx(colour_distance(image, training))
    for group, wanted in (("in_captions", True), ("not_in_captions", False)):
        assert all(r["in_captions"] == wanted for r in report["images"] if ("teal" in r["prompt"]) == wanted)
        values = [r["style"] for r in report["images"] if r["in_captions"] == wanted and r["multiplier"] == 1.0]
        assert report["means"][group]["1"] == pytest.approx(sum(values) / len(values))
