"""Safe image decoding and encoding.

`decode` turns any bytes into an RGB uint8 array or raises ImageError with a
short reason that becomes the `error` column: it applies EXIF orientation,
converts every mode (L, P, CMYK, RGBA, 16-bit) and refuses decompression bombs
before decoding their pixels.
"""

from __future__ import annotations

import io
import sys
import warnings

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from agepipe.config import CropSettings

# The pixel limit is enforced in `decode`; PIL's own limit would only warn below 2x.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

_IMAGE_MAGIC = (b"\xff\xd8", b"\x89PNG", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")


class ImageError(ValueError):
    """An input that cannot be decoded; `reason` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def pil_open():
    """PIL's own `Image.open`. Importing ultralytics replaces it with a wrapper that, on bytes PIL cannot
    identify, tries to pip-install pi-heif (and raises ModuleNotFoundError offline) instead of failing."""
    opener = Image.open
    if opener.__module__ != Image.__name__:
        opener = getattr(sys.modules.get(opener.__module__), "_image_open", opener)
    return opener


def decode(data: bytes, max_pixels: int = CropSettings.max_pixels) -> np.ndarray:
    """RGB uint8 array (H, W, 3) from encoded bytes; raises ImageError."""
    if not data:
        raise ImageError("empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = pil_open()(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError("too_large", f"{width}x{height} exceeds {max_pixels} pixels")
            fast = _decode_complete_color_jpeg(data, image)
            if fast is not None:
                return fast
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        reason = "corrupt" if data.startswith(_IMAGE_MAGIC) else "not_image"
        raise ImageError(reason, str(exc)) from exc
    except Image.DecompressionBombError as exc:
        raise ImageError("too_large", str(exc)) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = "truncated" if "truncated" in str(exc) else "corrupt"
        raise ImageError(reason, str(exc)) from exc


def _decode_complete_color_jpeg(data: bytes, header: Image.Image) -> np.ndarray | None:
    """A complete colour JPEG decoded by OpenCV, else None (PIL decodes it).

    The same pixels as PIL's decode with EXIF orientation applied (tested), faster (benchmarks/stages.py
    times decoding). Only files that end in the JPEG end marker:
    libjpeg fills a truncated file with grey and warns, where PIL raises (the `truncated` reason).
    """
    if header.format != "JPEG" or header.mode != "RGB" or not data.endswith(b"\xff\xd9"):
        return None
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def to_rgb(image: Image.Image) -> np.ndarray:
    """RGB uint8 array from any PIL mode; transparency is composited onto white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        high = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        gray = np.clip(array / high * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    array = np.asarray(image.convert("RGB"))
    if array.dtype != np.uint8:
        array = array.astype(np.uint8)
    return np.ascontiguousarray(array)


def encode(rgb: np.ndarray, encoding: str = "jpeg", quality: int = 95) -> bytes:
    """Encode an RGB uint8 array as JPEG (high quality) or lossless PNG."""
    if rgb.dtype != np.uint8:
        raise TypeError(f"encode expects uint8 pixels, got {rgb.dtype}")
    buffer = io.BytesIO()
    image = Image.fromarray(rgb, "RGB")
    if encoding == "jpeg":
        image.save(buffer, format="JPEG", quality=quality, subsampling=0)
    elif encoding == "png":
        image.save(buffer, format="PNG", compress_level=1)
    else:
        raise ValueError(f"unknown encoding {encoding!r}: use jpeg or png")
    return buffer.getvalue()
