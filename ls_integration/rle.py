"""Label Studio's brush RLE: masks to ``rle`` lists and back, with the header checked before anything is decoded.

A brush region's ``value.rle`` is Label Studio's run-length code of the
region's RGBA pixels (the mask is the alpha channel); label-studio-sdk's
``converter.brush`` encodes and decodes it. Its first four bytes say how many
values the code expands to, so a malformed or hostile region is refused from
that header before a single byte is allocated for it.
"""

from __future__ import annotations

import numpy as np
from label_studio_sdk.converter.brush import decode_rle, mask2rle

from .errors import AnnotationError


def encode_mask(mask: np.ndarray) -> list[int]:
    """An ``HxW`` bool mask as Label Studio's brush RLE (alpha 255 inside)."""
    return mask2rle(mask.astype(np.uint8) * 255)


def decode_mask(rle: object, height: int, width: int, max_pixels: int) -> np.ndarray:
    """The ``HxW`` bool mask of a brush region's RLE that claims to be ``width`` x ``height``.

    Raises :class:`AnnotationError` for a size over ``max_pixels``, a value
    that is not a list of bytes, or a header that does not match the size.
    """
    if height <= 0 or width <= 0 or height * width > max_pixels:
        raise AnnotationError(
            f"a brush region claims {width}x{height} pixels (limit {max_pixels:,}, MASKCLIP_MAX_IMAGE_PIXELS)"
        )
    if not isinstance(rle, list) or len(rle) < 5 or not all(isinstance(b, int) and 0 <= b < 256 for b in rle):
        raise AnnotationError("a brush region's 'rle' is not a list of bytes")
    claimed = int.from_bytes(bytes(rle[:4]), "big")  # how many values decode_rle would allocate
    if claimed != height * width * 4:
        raise AnnotationError(
            f"a brush region's RLE holds {claimed:,} values, not {width}x{height}x4 = {height * width * 4:,}"
        )
    return np.asarray(decode_rle(rle), dtype=np.uint8).reshape(height, width, 4)[:, :, 3] > 0
