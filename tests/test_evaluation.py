"""The style measure: the share of pixels within a distance of a palette colour."""

import math

import pytest
from PIL import Image

from hypernet.evaluation import palette_share

PALETTE = [(246, 232, 200), (0, 128, 128)]


def test_palette_share_counts_pixels_within_the_tolerance_of_any_colour():
    pixels = [(246, 232, 200)] * 30 + [(0, 128 + 39, 128)] * 20 + [(0, 128, 128 + 41)] * 10 + [(128, 128, 128)] * 40
    image = Image.new("RGB", (10, 10))
    image.putdata(pixels)
    assert palette_share(image, PALETTE, tolerance=40) == pytest.approx(0.5)
    assert palette_share(image, PALETTE, tolerance=41) == pytest.approx(0.6)
    distance_to_gray = min(math.dist((128, 128, 128), colour) for colour in PALETTE)
    assert palette_share(image, PALETTE, tolerance=distance_to_gray) == pytest.approx(1.0)


def test_palette_share_reads_any_image_mode():
    assert palette_share(Image.new("RGBA", (4, 4), (0, 128, 128, 0)), PALETTE) == 1.0
    assert palette_share(Image.new("L", (4, 4), 0), PALETTE) == 0.0


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
    for strength in (0, 1):
        subprocess.run([sys.executable, "generate.py", "--pretrained_model_name_or_path", demo, "--prompts_file",
                        str(prompts), "--hypernetwork", f"{tmp_path / 'check.pt'}:{strength}", "--seed", "3",
                        "--num_images", "2", "--num_inference_steps", "4", "--no_progress", "--output_dir",
                        str(tmp_path / f"s{strength}")], cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    out = tmp_path / "grid.png"
    result = subprocess.run([sys.executable, "examples/before_after.py", str(tmp_path / "s0"), str(tmp_path / "s1"),
                             "--train_data_dir", "examples/style_dataset", "--output", str(out)], cwd=ROOT,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "prompts in the training captions:" in result.stdout and "the 24 training images:" in result.stdout
    assert Image.open(out).size == (260 + 2 * (2 * 128 + 8), 20 + 2 * 128)
    report = json.loads((tmp_path / "grid.json").read_text())
    images = {(r["prompt"].split(",")[0], r["seed"], r["strength"]): r for r in report["images"]}
    # generate.py numbers seeds on across prompts: the first prompt gets 3 and 4, the second 5 and 6
    assert set(images) == {(p, s, k) for p, seeds in (("a teal star in the middle", (3, 4)),
                                                      ("a red square at the bottom", (5, 6))) for s in seeds
                           for k in (0.0, 1.0)}  # fmt: skip
    palette = [tuple(int(h[i : i + 2], 16) for i in (0, 2, 4)) for h in report["palette"]]
    for folder, strength in (("s0", 0.0), ("s1", 1.0)):
        for name in os.listdir(tmp_path / folder):
            if name.endswith(".png") and name != "grid.png":
                image = Image.open(tmp_path / folder / name)
                prompt, seed = image.info["parameters"].split(",")[0], int(name.split("-")[1].split(".")[0])
                assert images[prompt, seed, strength]["style"] == palette_share(image, palette)
    for group, wanted in (("in_captions", True), ("not_in_captions", False)):
        assert all(r["in_captions"] == wanted for r in report["images"] if ("teal" in r["prompt"]) == wanted)
        values = [r["style"] for r in report["images"] if r["in_captions"] == wanted and r["strength"] == 1.0]
        assert report["means"][group]["1"] == pytest.approx(sum(values) / len(values))


def test_before_after_refuses_a_palette_it_cannot_read(tmp_path):
    import subprocess
    import sys

    from helpers import ROOT

    result = subprocess.run([sys.executable, "examples/before_after.py", str(tmp_path), "--train_data_dir",
                             str(tmp_path), "--output", str(tmp_path / "g.png"), "--palette", "cream"], cwd=ROOT,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "--palette 'cream': give colours as comma-separated 6-digit hex RGB, e.g. f6e8c8,101010"
    ]
