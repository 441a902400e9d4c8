"""Safe decoding: every kind of bad input is a short reason; every mode becomes RGB uint8."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from agepipe.images import ImageError, decode, encode


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _photo(width: int = 64, height: int = 48) -> Image.Image:
    gradient = np.linspace(0, 255, width * height * 3).reshape(height, width, 3)
    return Image.fromarray(gradient.astype(np.uint8), "RGB")


def _pil_decode(data: bytes) -> np.ndarray:
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_is_applied(orientation: int) -> None:
    image = _photo(64, 48)
    exif = Image.Exif()
    exif[0x0112] = orientation  # 6: rotate 90 degrees clockwise when displayed
    data = _encode(image, "JPEG", exif=exif.tobytes())
    decoded = decode(data)
    assert decoded.shape == ((64, 48, 3) if orientation in (6, 8) else (48, 64, 3))
    np.testing.assert_array_equal(decoded, _pil_decode(data))


def test_jpegs_decode_to_pils_pixels(utkface_dir) -> None:
    """Complete colour JPEGs take OpenCV's faster decoder: the same pixels as PIL's."""
    files = sorted(utkface_dir.iterdir())[::700]
    for path in files:
        data = path.read_bytes()
        np.testing.assert_array_equal(decode(data), _pil_decode(data), err_msg=path.name)
    gray = _encode(_photo().convert("L"), "JPEG")
    np.testing.assert_array_equal(decode(gray), _pil_decode(gray))
    with_trailer = _encode(_photo(), "JPEG") + b"camera trailer"  # not ending in the end marker: PIL decodes
    np.testing.assert_array_equal(decode(with_trailer), _pil_decode(with_trailer))


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "LA", "I;16", "1"])
def test_every_mode_becomes_rgb_uint8(mode: str) -> None:
    if mode == "I;16":
        image = Image.fromarray((np.arange(48 * 64).reshape(48, 64) * 20).astype(np.uint16))
        fmt = "PNG"
    else:
        image = _photo().convert(mode)
        fmt = "TIFF" if mode == "CMYK" else "PNG"
    decoded = decode(_encode(image, fmt))
    assert decoded.dtype == np.uint8
    assert decoded.shape == (48, 64, 3)
    assert decoded.max() > 100, "pixels lost their range"


def test_sixteen_bit_scales_down_rather_than_clipping() -> None:
    image = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert decode(_encode(image, "PNG")).min() == 255


def test_transparent_pixels_become_white() -> None:
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    assert decode(_encode(rgba, "PNG")).min() == 255


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "empty"),
        (b"just some text, not an image at all", "not_image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20, "corrupt"),
    ],
)
def test_bad_bytes_have_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(ImageError) as error:
        decode(payload)
    assert error.value.reason == reason


def test_truncated_jpeg_is_reported() -> None:
    data = _encode(_photo(256, 256), "JPEG", quality=95)
    with pytest.raises(ImageError) as error:
        decode(data[: len(data) // 2])
    assert error.value.reason == "truncated"


def test_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = _encode(Image.new("1", (12_000, 12_000)), "PNG")
    assert len(bomb) < 200_000
    with pytest.raises(ImageError) as error:
        decode(bomb, max_pixels=40_000_000)
    assert error.value.reason == "too_large"


def test_encode_keeps_uint8_pixels_and_refuses_floats() -> None:
    face = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    assert np.array_equal(decode(encode(face, "png")), face)
    assert np.abs(decode(encode(face, "jpeg")).astype(int) - face).mean() < 12
    with pytest.raises(TypeError):
        encode(face.astype(np.float32) / 255.0)


def test_decoding_stays_safe_after_ultralytics_patches_pil() -> None:
    import ultralytics.utils.patches  # noqa: F401  (replaces PIL.Image.open on import)

    with pytest.raises(ImageError) as error:
        decode(b"plain text, not an image")
    assert error.value.reason == "not_image"
