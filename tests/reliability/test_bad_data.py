"""Images and captions of every kind: handled, or refused with the file's name, never silently skipped."""

import re

import numpy as np
import pytest
from PIL import Image

from hypernet import data
from hypernet.errors import UsageError


def open_image(path):
    return data.to_rgb(data.decode_image(path.read_bytes(), str(path)))


@pytest.mark.parametrize("mode", ["CMYK", "P", "RGBA", "LA", "L", "I;16", "1"])
def test_every_image_mode_becomes_rgb(tmp_path, mode):
    source = Image.new("RGB", (40, 30), (200, 100, 50))
    if mode == "I;16":
        image = Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16))
    else:
        image = source.convert(mode)
    path = tmp_path / ("x.tiff" if mode == "CMYK" else "x.png")
    image.save(path)
    loaded = open_image(path)
    assert loaded.mode == "RGB" and loaded.size == (40, 30)
    if mode == "I;16":
        assert abs(int(np.asarray(loaded)[0, 0, 0]) - round(40000 / 65535 * 255)) <= 1


def test_alpha_is_read_apart_from_the_rgb_pixels(tmp_path):
    """As the webui: the pixels are the RGB with the alpha dropped (not premultiplied); the alpha is the weight's."""
    image = Image.new("RGBA", (16, 16), (10, 20, 30, 128))
    image.save(tmp_path / "a.png")
    decoded = data.decode_image((tmp_path / "a.png").read_bytes(), "a.png")
    assert np.asarray(data.to_rgb(decoded))[0, 0].tolist() == [10, 20, 30]
    assert np.asarray(data.alpha_channel(decoded))[0, 0] == 128
    image.convert("P").save(tmp_path / "p.png", transparency=0)
    decoded = data.decode_image((tmp_path / "p.png").read_bytes(), "p.png")
    assert data.to_rgb(decoded).mode == "RGB"
    assert data.alpha_channel(decoded) is not None, "a palette's transparent colour is alpha too (the webui misses it)"
    assert data.alpha_channel(data.to_rgb(decoded)) is None


def test_huge_image_is_refused_by_name(tmp_path, monkeypatch):
    Image.new("RGB", (300, 300)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(UsageError, match=r"big.png: image too large to read safely .* downscale it first"):
        open_image(tmp_path / "big.png")


def test_truncated_image_is_refused_by_name(tmp_path):
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "t.jpg", quality=95)
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match=r"t.jpg: unreadable image"):
        open_image(tmp_path / "t.jpg")


def test_caption_encodings(tmp_path):
    (tmp_path / "u8.txt").write_bytes("\ufeffcafé, snow".encode("utf-8"))
    (tmp_path / "u16.txt").write_bytes("café, snow".encode("utf-16"))
    (tmp_path / "latin.txt").write_bytes("caf\xe9, snow".encode("latin-1"))
    assert data.read_caption(str(tmp_path / "u8.txt")) == "café, snow"
    assert data.read_caption(str(tmp_path / "u16.txt")) == "café, snow"
    with pytest.raises(UsageError, match=r"latin.txt: not UTF-8 or UTF-16 text; re-save it as UTF-8"):
        data.read_caption(str(tmp_path / "latin.txt"))


def test_tiny_image_is_refused_by_name(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "dot.png")
    with pytest.raises(UsageError, match=r"dot.png: image is 4x4, too small to train on"):
        data.check_images(data.folder_entries(str(tmp_path)))


def test_a_huge_image_of_any_suffix_is_refused_by_name_not_passed_over(tmp_path, monkeypatch):
    Image.new("RGB", (300, 300)).save(tmp_path / "scan.tiff")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(UsageError, match=r"scan.tiff: image too large to read safely"):
        data.check_images(data.folder_entries(str(tmp_path)))


@pytest.mark.parametrize(
    "captions, row, shown",
    [([[1, 2], [3]], 0, "list [1, 2]"), (["a red circle", None], 1, "null"), ([7, 8], 0, "int 7")],
)
def test_a_caption_that_is_not_text_is_refused_by_row(tmp_path, captions, row, shown):
    import json

    rows = []
    for n, caption in enumerate(captions):
        Image.new("RGB", (16, 16)).save(tmp_path / f"{n}.png")
        rows.append({"file_name": f"{n}.png", "text": caption})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    entries = data.dataset_entries(str(tmp_path))
    with pytest.raises(
        UsageError, match=rf"^caption_column 'text': {tmp_path} row {row} holds {re.escape(shown)} there, not text$"
    ):
        data.check_images(entries)
