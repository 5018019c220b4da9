"""Brush RLE: our encoder writes the bytes label-studio-sdk's encoder writes, for every kind of mask."""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle, mask2rle

from ls_integration.rle import encode_mask
from tests.scenes import make_scene


def sdk_rle(mask: np.ndarray) -> list[int]:
    return [int(b) for b in mask2rle(mask.astype(np.uint8) * 255)]


def masks() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    found = [
        ("empty", np.zeros((5, 7), dtype=bool)),
        ("full", np.ones((448, 672), dtype=bool)),  # one run of 1.2M values: many full 16-bit tokens
        ("diagonal", np.eye(9, dtype=bool)),
        ("noise", rng.random((40, 50)) > 0.5),  # runs of one pixel (4 values) everywhere
        ("one pixel at the end", np.pad(np.ones((1, 1), dtype=bool), ((30, 0), (40, 0)))),
    ]
    _, labels = make_scene(3, 360, 480)
    found += [(f"scene label {label}", labels == label) for label in np.unique(labels)]
    # Runs at every field size's edges, in values: 8, 16, 256 and 65536 (= 16384 pixels).
    for pixels in (1, 2, 3, 4, 5, 63, 64, 65, 16383, 16384, 16385, 32768, 32769):
        line = np.zeros(70_000, dtype=bool)
        line[1000 : 1000 + pixels] = True
        found.append((f"a run of {pixels} pixels", line.reshape(700, 100)))
    return found


@pytest.mark.parametrize(("name", "mask"), masks(), ids=[name for name, _ in masks()])
def test_encode_mask_writes_the_sdk_encoders_bytes(name: str, mask: np.ndarray) -> None:
    ours = encode_mask(mask)
    assert ours == sdk_rle(mask), name
    decoded = np.asarray(decode_rle(ours), dtype=np.uint8).reshape(*mask.shape, 4)
    assert (decoded == np.where(mask, 255, 0)[..., None]).all()  # every channel, as Label Studio paints it


def test_an_empty_mask_is_refused() -> None:
    with pytest.raises(ValueError, match="empty mask"):
        encode_mask(np.zeros((0, 4), dtype=bool))
