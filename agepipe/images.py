"""Safe image decoding and encoding.

`SourceImage` reads an image's header and decodes its pixels on demand, a JPEG at a
reduced (DCT-scaled) size where that is all a step needs; `decode` gives every pixel.
Both raise ImageError with a short reason that becomes the `error` column: they apply
EXIF orientation, convert every mode (L, P, CMYK, RGBA, 16-bit) and refuse
decompression bombs before decoding their pixels.
"""

from __future__ import annotations

import contextlib
import io
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from agepipe.config import CropSettings
from agepipe.registry import Registry

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


# libjpeg's DCT scaling: a JPEG decodes at 1/2, 1/4 or 1/8 of its size for a fraction of the full cost.
JPEG_REDUCTIONS = (1, 2, 4, 8)
_OPENCV_FLAGS = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}
_ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class SourceImage:
    """An image's upright size, read from its header, and its pixels decoded on demand: a JPEG at the
    smallest DCT scale that gives what is asked, so a 12-megapixel photo is never held whole unless a face
    in it needs every pixel. The last decode is kept until a finer one is asked for or the image is dropped.

    Raises ImageError when the bytes are not a decodable image within `max_pixels`."""

    def __init__(self, data: bytes, max_pixels: int = CropSettings.max_pixels) -> None:
        if not data:
            raise ImageError("empty")
        self.data = data
        with _image_errors(data):
            header = pil_open()(io.BytesIO(data))
            stored_width, stored_height = header.size
            if stored_width * stored_height > max_pixels:
                raise ImageError("too_large", f"{stored_width}x{stored_height} exceeds {max_pixels} pixels")
            rotated = header.getexif().get(0x0112, 1) in _ROTATED_ORIENTATIONS
        self.width, self.height = (stored_height, stored_width) if rotated else (stored_width, stored_height)
        self._opencv_jpeg = header.format == "JPEG" and header.mode == "RGB" and data.endswith(b"\xff\xd9")
        self._jpeg = header.format == "JPEG"
        self._decoded: tuple[int, np.ndarray] | None = None

    @classmethod
    def from_pixels(cls, pixels: np.ndarray) -> SourceImage:
        """An image already decoded (RGB uint8): `pixels` gives it as it is."""
        image = cls.__new__(cls)
        image.height, image.width = pixels.shape[:2]
        image._decoded = (1, pixels)
        image._jpeg = image._opencv_jpeg = False
        return image

    @property
    def long_side(self) -> int:
        return max(self.width, self.height)

    def reduction_for(self, long_side: int) -> int:
        """The coarsest DCT scale whose decode has a longer side of at least `long_side` (1 for other formats)."""
        if not self._jpeg:
            return 1
        fits = [r for r in JPEG_REDUCTIONS if -(-self.long_side // r) >= long_side]
        return max(fits, default=1)

    def pixels(self, long_side: int | None = None) -> np.ndarray:
        """RGB uint8 pixels, upright, with a longer side of at least `long_side` where the image has it
        (None: every pixel). Their scale to the upright image is `width / shape[1]`, `height / shape[0]`."""
        reduction = 1 if long_side is None else self.reduction_for(long_side)
        if self._decoded is not None and self._decoded[0] <= reduction:
            return self._decoded[1]
        self._decoded = None  # release the coarser frame before decoding the finer one
        with _image_errors(self.data):
            self._decoded = (reduction, self._decode(reduction))
        return self._decoded[1]

    def release(self) -> None:
        """Drop the decoded pixels."""
        self._decoded = None

    def _decode(self, reduction: int) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self._opencv_jpeg:
                # Only files that end in the JPEG end marker: libjpeg fills a truncated file with grey and
                # warns, where PIL raises (the `truncated` reason). OpenCV applies the EXIF orientation too.
                bgr = cv2.imdecode(np.frombuffer(self.data, np.uint8), _OPENCV_FLAGS[reduction])
                if bgr is not None:
                    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=bgr)  # in place: one frame, not two
            image = pil_open()(io.BytesIO(self.data))
            if reduction > 1:
                image.draft("RGB", (-(-image.size[0] // reduction), -(-image.size[1] // reduction)))
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))


@contextlib.contextmanager
def _image_errors(data: bytes) -> Iterator[None]:
    """Decoders' exceptions as ImageError with a short reason."""
    try:
        yield
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


def decode(data: bytes, max_pixels: int = CropSettings.max_pixels) -> np.ndarray:
    """Every pixel of an image, RGB uint8 (H, W, 3), EXIF orientation applied; raises ImageError."""
    return SourceImage(data, max_pixels).pixels()


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


# PIL's save options per crop encoding, from the JPEG quality: JPEG without chroma subsampling, PNG lossless.
ENCODINGS: Registry[Callable[[int], dict[str, Any]]] = Registry(
    "encoding",
    {
        "jpeg": lambda quality: {"format": "JPEG", "quality": quality, "subsampling": 0},
        "png": lambda quality: {"format": "PNG", "compress_level": 1},
    },
)


def encode(rgb: np.ndarray, encoding: str = "jpeg", quality: int = 95) -> bytes:
    """Encode an RGB uint8 array as JPEG (high quality) or lossless PNG."""
    if rgb.dtype != np.uint8:
        raise TypeError(f"encode expects uint8 pixels, got {rgb.dtype}")
    options = ENCODINGS.create(encoding, quality)
    buffer = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buffer, **options)
    return buffer.getvalue()
