"""The store's compact encoding: the rotation keeps dot products, 8 and 4 bits keep what features and keys are
used for, and large channels do not cost the rest their precision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maskclip_engine.features import compact


def grid(channels: int, seed: int = 0, locations: tuple[int, int] = (6, 7), windows: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(windows, channels, *locations, generator=generator)


def cosines(keys: torch.Tensor) -> torch.Tensor:
    flat = F.normalize(keys[0].flatten(1), dim=0)
    return flat.T @ flat


@pytest.mark.parametrize("channels", [768, 512, 24, 7])
def test_the_rotation_is_orthogonal_and_its_own_inverse(channels: int) -> None:
    rows = grid(channels).permute(0, 2, 3, 1).reshape(-1, channels)
    turned = compact.rotate(rows)
    torch.testing.assert_close(compact.rotate(turned), rows, atol=1e-5, rtol=0)
    torch.testing.assert_close(turned @ turned.T, rows @ rows.T, atol=1e-3, rtol=1e-5)  # every dot product kept
    if channels % 2 == 0:
        assert not torch.allclose(turned, rows)


@pytest.mark.parametrize(("bits", "bound"), [(8, 0.01), (4, 0.15)])
@pytest.mark.parametrize("channels", [768, 512, 24, 5])
def test_a_round_trip_keeps_shape_and_is_close(bits: int, bound: float, channels: int) -> None:
    tensor = grid(channels, windows=2) * 7
    quantised = compact.encode(tensor, bits)
    decoded = compact.decode(quantised)
    assert decoded.shape == tensor.shape and decoded.dtype == torch.float32
    assert float((decoded - tensor).norm() / tensor.norm()) < bound
    assert quantised.values.numel() + 2 * quantised.scales.numel() == compact.quantised_bytes(channels, 84, bits)
    assert torch.equal(compact.decode(quantised), decoded)  # the same answer every time


def test_four_bit_keys_keep_cosine_similarities_even_with_a_few_huge_channels() -> None:
    keys = grid(768, locations=(12, 14))
    keys[:, :4] *= 30  # ViTs' keys have a few channels far larger than the rest
    error = (cosines(compact.decode(compact.encode(keys, 4))) - cosines(keys)).abs()
    assert error.mean() < 0.01 and error.max() < 0.06
    saved = compact.rotate
    try:  # without the rotation one location's scale is set by its huge channels and the rest lose their bits
        compact.rotate = lambda rows: rows
        unturned = (cosines(compact.decode(compact.encode(keys, 4))) - cosines(keys)).abs()
    finally:
        compact.rotate = saved
    assert unturned.mean() > 3 * error.mean()


def test_zero_vectors_and_bf16_inputs_decode_without_nans() -> None:
    tensor = grid(512).to(torch.bfloat16)
    tensor[:, :, 0, 0] = 0
    for bits in (8, 4):
        decoded = compact.decode(compact.encode(tensor, bits))
        assert torch.isfinite(decoded).all() and torch.equal(decoded[:, :, 0, 0], torch.zeros(1, 512))


def test_only_8_or_4_bits() -> None:
    with pytest.raises(ValueError, match="8 or 4 bits"):
        compact.encode(grid(8), 6)
