"""Inference preprocessing (export/bundle.py): raw bytes and text -> the tensors every model sees."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from export.bundle import (
    ImageDecodeError,
    ImageTooLargeError,
    InputLimits,
    PreprocessSpec,
    TextEmptyError,
    TextEncoder,
    TextTooLongError,
    decode_image,
    image_to_array,
    preprocess_images,
)

NOISE_PNG_SHAPE = (32, 32, 3)
SPEC = PreprocessSpec(image_size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _noise_png() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, NOISE_PNG_SHAPE, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


NOISE_PNG = _noise_png()


def expected(rgb: tuple[int, int, int]) -> np.ndarray:
    """The normalised value of a solid colour under SPEC, per channel."""
    return (np.asarray(rgb, np.float32) / 255.0 - 0.5) / 0.25


def test_png_rgb_gives_exact_normalised_chw_tensor():
    out = preprocess_images([encode(Image.new("RGB", (8, 8), (255, 0, 128)))], SPEC)
    assert out.shape == (1, 3, 8, 8) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, 3, 3], expected((255, 0, 128)), atol=1e-6)
    assert np.ptp(out[0], axis=(1, 2)).max() == 0  # a solid image stays solid


@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_table_normalisation_is_bit_identical_to_float_arithmetic(order):
    """Training, the parity gate and the server share image_to_array: its look-up table must give exactly the
    float32 values of (x / 255 - mean) / std, or a served model would see other inputs than it was checked on."""
    spec = PreprocessSpec(image_size=16, mean=(0.481, 0.458, 0.408), std=(0.269, 0.261, 0.276), channel_order=order)
    pixels = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    pixels[0, :3] = [[0, 0, 0], [255, 255, 255], [1, 128, 254]]  # both ends of the table
    ref = (pixels.astype(np.float32) * np.float32(1.0 / 255.0) - np.asarray(spec.mean, np.float32)) \
        / np.asarray(spec.std, np.float32)  # (H, W, 3)
    ref = ref[..., ::-1] if order == "BGR" else ref
    out = image_to_array(Image.fromarray(pixels), spec)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    assert np.array_equal(out, ref.transpose(2, 0, 1))


def test_image_to_array_refuses_images_that_are_not_8_bit_rgb():
    with pytest.raises(ValueError, match="8-bit RGB"):
        image_to_array(Image.new("L", (8, 8)), SPEC)


def test_jpeg_is_decoded_close_to_its_source_colour():
    out = preprocess_images([encode(Image.new("RGB", (8, 8), (200, 40, 40)), "JPEG", quality=95)], SPEC)
    np.testing.assert_allclose(out[0, :, 4, 4], expected((200, 40, 40)), atol=4 / 255 / 0.25)


def test_rgba_drops_alpha_and_grayscale_replicates_channels():
    rgba = encode(Image.new("RGBA", (8, 8), (10, 20, 30, 0)))
    gray = encode(Image.new("L", (8, 8), 77))
    out = preprocess_images([rgba, gray], SPEC)
    np.testing.assert_allclose(out[0, :, 0, 0], expected((10, 20, 30)), atol=1e-6)
    np.testing.assert_allclose(out[1, :, 0, 0], expected((77, 77, 77)), atol=1e-6)


def test_16bit_grayscale_is_rescaled_not_clipped():
    array = np.full((8, 8), 32896, dtype=np.uint16)  # 50% grey in 16 bits
    out = preprocess_images([encode(Image.fromarray(array))], SPEC)
    np.testing.assert_allclose(out[0, :, 0, 0], expected((128, 128, 128)), atol=1e-6)


def test_exif_orientation_is_applied():
    # 8 wide x 4 tall: left half red, right half blue. Orientation 6 means "rotate 90° clockwise to display",
    # so the displayed image is 4 wide x 8 tall with red on top.
    image = Image.new("RGB", (8, 4), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 4, 4))
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = decode_image(encode(image, "JPEG", quality=100, exif=exif.tobytes()))
    assert decoded.size == (4, 8)
    out = preprocess_images([encode(image, "PNG", exif=exif.tobytes())], SPEC)
    assert out[0, 0, 0, 4] > 1.5 and out[0, 2, 0, 4] < -1.5  # top row red
    assert out[0, 0, 7, 4] < -1.5 and out[0, 2, 7, 4] > 1.5  # bottom row blue


def test_resize_uses_the_spec_size():
    out = preprocess_images([encode(Image.new("RGB", (32, 20), (0, 255, 0)))], SPEC)
    assert out.shape == (1, 3, 8, 8)
    np.testing.assert_allclose(out[0, :, 4, 4], expected((0, 255, 0)), atol=1e-5)


@pytest.mark.parametrize(
    "data, error, words",
    [
        (b"", ImageDecodeError, "empty"),
        (b"definitely not an image", ImageDecodeError, "not a decodable image"),
        (NOISE_PNG[: len(NOISE_PNG) // 2], ImageDecodeError, "truncated or corrupt"),
        (encode(Image.new("RGB", (8, 8)), "GIF"), ImageDecodeError, "format GIF"),
    ],
)
def test_bad_images_raise_named_errors(data, error, words):
    with pytest.raises(error, match=words) as info:
        preprocess_images([data], SPEC)
    assert info.value.field == "image[0]"


def test_decompression_bomb_is_refused_from_the_header():
    bomb = encode(Image.new("L", (3000, 3000)))
    with pytest.raises(ImageTooLargeError, match="pixels"):
        decode_image(bomb, InputLimits(max_image_pixels=1_000_000))


def test_encoded_size_limit():
    data = encode(Image.new("RGB", (8, 8)))
    with pytest.raises(ImageTooLargeError, match="bytes"):
        decode_image(data, InputLimits(max_image_bytes=len(data) - 1))


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "what": 2, "colour": 3, "is": 4, "the": 5, "circle": 6}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return TextEncoder(tok, PreprocessSpec(max_text_length=4), InputLimits(max_text_chars=40))


def test_text_is_lowercased_padded_to_longest_and_truncated(encoder):
    ids, mask = encoder.encode(["What colour", "what is the colour of the circle"])
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    assert ids.tolist() == [[2, 3, 0, 0], [2, 4, 5, 3]]  # truncated at 4 tokens, padded with [PAD]=0
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    ids, _ = encoder.encode(["circle"])
    assert ids.shape == (1, 1)  # padded to the longest in the batch, not to the maximum


def test_text_limits(encoder):
    with pytest.raises(TextEmptyError, match="text: is empty"):
        encoder.encode(["   "])
    with pytest.raises(TextTooLongError, match="41 characters"):
        encoder.encode(["x" * 41])
