"""Reading and checking images: everything becomes an ``HxWx3 uint8`` RGB array."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from maskclip_engine.errors import InvalidImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DEFAULT_MAX_PIXELS = 50_000_000


def to_rgb_array(image: Any) -> np.ndarray:
    """A file path, a PIL image or an ``HxW``/``HxWx3``/``HxWx4`` uint8 array as ``HxWx3 uint8``."""
    if isinstance(image, (str, Path)):
        return decode_image(image)
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise InvalidImageError(f"image has no pixels ({image.width}x{image.height}).")
        return np.array(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise InvalidImageError(
                f"image arrays must be uint8 (0-255), got {image.dtype}; convert with (x * 255).astype(np.uint8)."
            )
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise InvalidImageError(f"image arrays must be HxWx3 (RGB), got shape {image.shape}.")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise InvalidImageError(f"image has no pixels (shape {image.shape}).")
        return np.ascontiguousarray(image[:, :, :3])
    raise InvalidImageError(
        f"expected a file path, a PIL image or a numpy uint8 array, got {type(image).__name__}."
    )


def decode_image(source: str | Path | bytes | BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a file, bytes or stream to ``HxWx3 uint8``, honouring EXIF orientation.

    Raises :class:`InvalidImageError` for unreadable, truncated, empty or
    oversized images (more than ``max_pixels``, checked before decoding).
    """
    name = str(source) if isinstance(source, (str, Path)) else "image data"
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        with Image.open(source) as img:
            width, height = img.size
            if width == 0 or height == 0:
                raise InvalidImageError(f"{name} has no pixels ({width}x{height}).")
            if width * height > max_pixels:
                raise InvalidImageError(
                    f"{name} is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}; "
                    "downscale it or raise the limit."
                )
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb_array(img)
    except FileNotFoundError as exc:
        raise InvalidImageError(f"{name} does not exist.") from exc
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise InvalidImageError(f"{name} is not a readable image: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise InvalidImageError(f"{name} could not be decoded (corrupt or truncated?): {exc}") from exc


def list_images(path: Path) -> list[Path]:
    """The image files of a folder (sorted), or the file itself."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return [path]


def resized_shape(height: int, width: int, short_side: int, max_long_side: int, multiple: int) -> tuple[int, int]:
    """Size with the short side at ``short_side`` (long side capped), both sides multiples of ``multiple``."""
    scale = short_side / min(height, width)
    scale = min(scale, max_long_side / max(height, width))

    def snap(side: int) -> int:
        return max(multiple, int(math.floor(side * scale / multiple + 0.5)) * multiple)

    return snap(height), snap(width)


def window_starts(length: int, window: int, step: int) -> list[int]:
    """Start offsets of sliding windows covering ``length``; the last one ends at the edge."""
    if window >= length:
        return [0]
    count = math.ceil((length - window) / step) + 1
    return sorted({min(i * step, length - window) for i in range(count)})
