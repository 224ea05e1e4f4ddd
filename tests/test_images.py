"""Decoding unusual and broken image files (lqae_sklearn._images), with real files."""

import builtins
import errno
import os
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from lqae_sklearn._images import (
    ImageLoadError,
    describe_training_data,
    domain_gap,
    image_source,
    image_summary,
    load_image,
    normalize_mode,
    prepare_image,
    to_model_input,
)

GRAY28 = {"image_size": 28, "color_mode": "L", "resample": "bilinear"}
RGB28 = {"image_size": 28, "color_mode": "RGB", "resample": "bilinear"}


@pytest.fixture(autouse=True)
def _ok_png(tmp_path):
    Image.new("L", (4, 4)).save(tmp_path / "ok.png")


def write_bilevel_png(path, width, height):
    """A valid all-black 1-bit PNG of any size, streamed so that a huge one costs kilobytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")  # really stored as 16 bit
    image = load_image(tmp_path / "deep.png")
    assert image.mode == "L"
    np.testing.assert_array_equal(np.asarray(image)[0], [0, 64, 128, 255])


def test_sixteen_bit_pil_image_is_scaled_in_to_model_input():
    image = Image.fromarray(np.full((28, 28), 257 * 100, dtype=np.uint16))
    assert to_model_input(image, GRAY28)[0, 0, 0] == pytest.approx(100 / 255)


def test_palette_with_transparency_is_composited_on_black(tmp_path):
    palette_image = Image.new("P", (8, 8), 1)
    palette_image.putpalette([255, 255, 255, 200, 50, 50] + [0, 0, 0] * 254)  # index 0 white, 1 red
    palette_image.paste(0, (0, 0, 4, 8))  # left half: white, but transparent
    palette_image.save(tmp_path / "pal.png", transparency=0)
    assert Image.open(tmp_path / "pal.png").info.get("transparency") == 0
    pixels = np.asarray(load_image(tmp_path / "pal.png"))
    np.testing.assert_array_equal(pixels[0, 0], [0, 0, 0])  # transparent white -> background
    np.testing.assert_array_equal(pixels[0, 7], [200, 50, 50])


def test_rgba_and_la_alpha_is_composited(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = 255
    rgba[..., 3] = 128  # half transparent white over black -> mid grey
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert np.asarray(load_image(tmp_path / "a.png"))[0, 0, 0] in (127, 128)
    la = Image.fromarray(rgba[..., 2:], "LA")
    assert normalize_mode(la).mode == "L"
    assert np.asarray(normalize_mode(la))[0, 0] in (127, 128)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # pure red in CMYK
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    image = load_image(tmp_path / "cmyk.jpg")
    assert image.mode == "RGB"
    red, green, blue = np.asarray(image)[8, 8].astype(int)
    assert red > 200 and green < 60 and blue < 60


def test_exif_orientation_is_honoured(tmp_path):
    # 40 wide x 20 high, left half white; orientation 6 = "rotate 90 degrees clockwise to display".
    pixels = np.zeros((20, 40), dtype=np.uint8)
    pixels[:, :20] = 255
    stored = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    image = load_image(tmp_path / "rotated.jpg")
    assert image.size == (20, 40)  # upright: 20 wide, 40 high
    upright = np.asarray(image)
    assert upright[:15].mean() > 200 and upright[25:].mean() < 50  # the white half is now on top


def test_bilevel_image_becomes_gray(tmp_path):
    Image.new("1", (5, 5), 1).save(tmp_path / "bw.png")
    image = load_image(tmp_path / "bw.png")
    assert image.mode == "L" and np.asarray(image).min() == 255


def test_float_image_in_unit_range_is_scaled():
    image = Image.fromarray(np.full((3, 3), 0.5, dtype=np.float32), "F")
    assert np.asarray(normalize_mode(image))[0, 0] == 128


@pytest.mark.parametrize("pixels", [10_000 * 10_000, 20_000 * 20_000])
def test_decompression_bomb_is_an_error_not_a_crash(tmp_path, pixels):
    side = int(pixels**0.5)
    write_bilevel_png(tmp_path / "bomb.png", side, side)
    assert os.path.getsize(tmp_path / "bomb.png") < 2_000_000
    assert side * side > Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageLoadError, match="decompression-bomb limit") as info:
        load_image(tmp_path / "bomb.png")
    assert info.value.item == str(tmp_path / "bomb.png")


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("empty.png", b"", "not an image"),
        ("noise.jpg", bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "not an image"),
        ("notes.txt", b"hello, not a picture\n", "not an image"),
    ],
)
def test_files_that_are_not_images(tmp_path, name, content, reason):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ImageLoadError, match=reason):
        load_image(tmp_path / name)


def test_truncated_png(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="cannot decode image") as info:
        load_image(tmp_path / "cut.png")
    assert "cut.png" in str(info.value)


def test_folder_and_missing_file(tmp_path):
    (tmp_path / "x.png").mkdir()
    with pytest.raises(ImageLoadError, match="is a folder"):
        load_image(tmp_path / "x.png")
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path / "missing.png")


def test_unreadable_file(tmp_path, monkeypatch):
    """Permission denied, also under root (which reads any file whatever its mode bits, as CI runs): the open
    of that one path is refused as the kernel refuses it, and the error names the file."""
    secret = tmp_path / "secret.png"
    Image.new("L", (4, 4)).save(secret)
    real_open = builtins.open

    def open_refusing_the_secret(file, *args, **kwargs):
        if os.fspath(file) == str(secret):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(secret))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_refusing_the_secret)  # Pillow opens files with builtins.open
    with pytest.raises(ImageLoadError, match="permission denied") as info:
        load_image(secret)
    assert info.value.item == str(secret) and str(secret) in str(info.value)
    assert isinstance(info.value.__cause__, PermissionError)
    with pytest.raises(ImageLoadError, match=re.escape(f"X[1] ({str(secret)!r}): permission denied")):
        image_source([tmp_path / "ok.png", secret], GRAY28).batch(1, 2)
    assert load_image(tmp_path / "ok.png").size == (4, 4)  # other files open as usual


def test_prepare_image_matches_to_model_input(tmp_path):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    for preprocessing in (GRAY28, RGB28):
        prepared = np.asarray(prepare_image(image, preprocessing))
        model_input = to_model_input(image, preprocessing)
        expected = prepared[None] if prepared.ndim == 2 else prepared.transpose(2, 0, 1)
        np.testing.assert_array_equal(model_input, expected.astype(np.float32) / 255.0)
        # An already prepared uint8 array goes through unchanged.
        np.testing.assert_array_equal(to_model_input(prepared, preprocessing), model_input)


# -- how far images are from a checkpoint's training data -----------------------------------------
FASHION_MNIST_TRAIN = {"source": "fashion-mnist", "split": "train", "num_images": 60000}


def test_image_summary_counts_colour_only_where_the_channels_differ():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert image_summary(gray) == (3, 4, "L")
    assert image_summary(np.repeat(gray[..., None], 3, axis=-1)) == (3, 4, "L")  # a gray photo saved as RGB
    colour = np.repeat(gray[..., None], 3, axis=-1)
    colour[1, 2, 0] += 1
    assert image_summary(colour) == (3, 4, "RGB")
    assert image_summary(Image.fromarray(colour)) == (3, 4, "RGB")
    assert image_summary(Image.fromarray(gray)) == (3, 4, "L")
    assert image_summary(Image.fromarray(np.repeat(gray[..., None], 3, axis=-1))) == (3, 4, "L")


def test_domain_gap_is_silent_near_the_checkpoints_images():
    for size in [(28, 28), (56, 40), (112, 112), (7, 7)]:  # up to 4 times larger or smaller on a side
        assert domain_gap([(*size, "L")] * 3, GRAY28, FASHION_MNIST_TRAIN) is None
        assert domain_gap([(*size, "RGB")] * 3, RGB28, None) is None


def test_domain_gap_names_what_is_far_the_training_data_and_the_remedy():
    message = domain_gap([(427, 640, "RGB"), (427, 640, "RGB"), (28, 28, "L")], GRAY28, FASHION_MNIST_TRAIN)
    assert message.startswith("2 of 3 images are much larger than 28 x 28; 2 of 3 images are colour (e.g. 427 x 640 "
                              "colour), but this checkpoint was trained on fashion-mnist train, 60,000 images, 28 x 28 "
                              "grayscale")
    assert "lqae-train --data FOLDER --preset small-rgb --image-size SIZE --out RUN" in message
    small = domain_gap([(6, 6, "L")], GRAY28, FASHION_MNIST_TRAIN)
    assert small.startswith("1 of 1 images are much smaller than 28 x 28 (e.g. 6 x 6 grayscale)")
    gray_to_colour = domain_gap([(28, 28, "L")] * 2, RGB28, {"source": "folder", "path": "/data/birds", "num_images": 1234})
    assert gray_to_colour.startswith("2 of 2 images are grayscale (e.g. 28 x 28 grayscale), but this checkpoint was "
                                     "trained on the images under /data/birds, 1,234 images, 28 x 28 colour")
    assert "--preset small-28 " in gray_to_colour
    assert describe_training_data(None) == describe_training_data({}) == "data its config does not record"
    assert describe_training_data({"source": "npy", "path": "x.npy", "num_images": 5}) == "x.npy, 5 images"
