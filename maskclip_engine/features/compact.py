"""The feature store's compact encoding: dense features in 8 bits and keys in 4 bits per value.

What each tensor must keep decides its width:

* **Features** ``[W, D, h, w]`` become class logits through dot products with
  text embeddings, and the ``clip`` student regresses them, so they keep 8
  bits: one signed byte per value.
* **Keys** ``[W, K, h, w]`` are only ever compared with each other (key
  smoothing's cosine weights, smart-tool similarities), so they keep 4 bits,
  two values per byte.

Before rounding, each location's vector is turned by a fixed orthogonal
rotation (Walsh-Hadamard blocks of up to 256 channels, after a fixed pattern
of sign flips). A rotation keeps every dot product, and it spreads a channel
that is much larger than the rest (ViTs have some) over all channels of its
block, so a location's scale follows its vector's norm rather than its
largest channel. Decoding applies the same rotation again (it is its own
inverse) and returns float32 tensors in the original channel order.

Each location has one fp16 scale per rotation block. Its steps span the
block's largest value or a share of it (values beyond are clipped), whichever
rounds the block with the least squared error: for 4 bits on a vector that
the rotation made about Gaussian that is about 0.8 of the largest value.

At short side 448 a 640x480 image's entry is about 0.94 MB (a 16-bit entry
was 2.7 MB); ``benchmarks/bench_scale.py`` measures size and agreement.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

FORMAT = "compact-1"  # the store's metadata names the encoding; entries without it hold 16-bit tensors
_BLOCK = 256  # the largest Walsh-Hadamard block
_CLIP_SHARES = (1.0, 0.85, 0.7)  # 4 bits: the shares of a group's largest value its steps may span


@dataclass(frozen=True)
class Quantised:
    """One tensor ``[W, C, h, w]`` as integers ``[W, h, w, ...]`` and fp16 scales ``[W, h, w, G]``.

    ``G`` is the number of rotation blocks of ``C`` channels: each location's
    block has a scale of its own.
    """

    values: torch.Tensor  # int8 (8 bits) or uint8 holding two 4-bit values
    scales: torch.Tensor
    channels: int
    bits: int

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {f"{name}.values": self.values, f"{name}.scales": self.scales}


def encode(tensor: torch.Tensor, bits: int) -> Quantised:
    """``tensor`` ``[W, C, h, w]`` (any float dtype, any device) rounded to ``bits`` (8 or 4) on the CPU."""
    if bits not in (8, 4):
        raise ValueError(f"the compact store keeps 8 or 4 bits per value, not {bits}.")
    channels = tensor.shape[1]
    rows = _grouped(rotate(tensor.detach().float().permute(0, 2, 3, 1)))  # [W, h, w, G, block]
    top = 2 ** (bits - 1) - 1  # 127 or 7: symmetric, so zero is exact
    largest = rows.abs().amax(dim=-1)
    best_values = best_scales = best_error = None
    # The clipping with the least squared error, chosen per location and group.
    for share in _CLIP_SHARES if bits == 4 else (1.0,):
        scales = (largest * share / top).to(torch.float16)
        steps = scales.float().clamp_min(torch.finfo(torch.float16).tiny).unsqueeze(-1)
        values = torch.round(rows / steps).clamp_(-top, top)
        error = (values * steps - rows).pow(2).sum(dim=-1)
        if best_error is None:
            best_values, best_scales, best_error = values, scales, error
        else:
            better = error < best_error
            best_values = torch.where(better.unsqueeze(-1), values, best_values)
            best_scales = torch.where(better, scales, best_scales)
            best_error = torch.minimum(error, best_error)
    values = best_values.flatten(-2).to(torch.int8)
    if bits == 4:
        values = _pack(values + 8)
    return Quantised(values.cpu().contiguous(), best_scales.cpu().contiguous(), channels, bits)


def decode(quantised: Quantised, device: torch.device | str = "cpu") -> torch.Tensor:
    """The float32 tensor ``[W, C, h, w]`` on ``device`` that :func:`encode` rounded ``quantised`` from."""
    values = quantised.values.to(device)
    if quantised.bits == 4:
        values = _unpack(values, quantised.channels).to(torch.int8) - 8
    rows = _grouped(values.float()) * quantised.scales.to(device).float().unsqueeze(-1)
    return rotate(rows.flatten(-2)).permute(0, 3, 1, 2).contiguous()


def rotate(rows: torch.Tensor) -> torch.Tensor:
    """``rows`` ``[..., C]`` turned by the fixed orthogonal rotation for ``C`` channels (its own inverse)."""
    channels = rows.shape[-1]
    block = _block_size(channels)
    if block == 1:
        return rows
    signs, hadamard = _rotation(channels, block, rows.device)
    blocks = (rows * signs).reshape(-1, block) @ hadamard  # one 2-D product: several times faster than batched
    return blocks.reshape(rows.shape) * signs


def quantised_bytes(channels: int, locations: int, bits: int) -> int:
    """Bytes one tensor of ``channels`` at ``locations`` takes: values and an fp16 scale per group."""
    per_location = channels if bits == 8 else (channels + 1) // 2
    return locations * (per_location + 2 * (channels // _block_size(channels)))


def _grouped(rows: torch.Tensor) -> torch.Tensor:
    """``[..., C]`` as ``[..., G, block]``: each rotation block has a scale of its own."""
    block = _block_size(rows.shape[-1])
    return rows.reshape(*rows.shape[:-1], rows.shape[-1] // block, block)


def _block_size(channels: int) -> int:
    block = 1
    while block < _BLOCK and channels % (2 * block) == 0:
        block *= 2
    return block


@lru_cache(maxsize=16)
def _rotation(channels: int, block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sign flips ``[C]`` and the normalised, symmetric Sylvester-Hadamard matrix ``[block, block]``.

    The rotation applied is ``diag(s) · blockdiag(H) · diag(s)``: symmetric and
    orthogonal, so applying it twice gives back the input. The signs come from
    a fixed integer hash, so every process and version computes the same ones.
    """
    index = torch.arange(channels, dtype=torch.int64)
    signs = 1.0 - 2.0 * (((index * 2654435761) >> 13) & 1).float()
    hadamard = torch.ones(1, 1)
    while hadamard.shape[0] < block:
        hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)], 0)
    return signs.to(device), (hadamard / block**0.5).to(device)


def _pack(values: torch.Tensor) -> torch.Tensor:
    """4-bit values ``[..., C]`` (0..15) two to a byte ``[..., ceil(C / 2)]``, the even channel in the low half."""
    if values.shape[-1] % 2:
        values = torch.cat([values, values.new_zeros((*values.shape[:-1], 1))], dim=-1)
    pairs = values.to(torch.uint8).reshape(*values.shape[:-1], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def _unpack(packed: torch.Tensor, channels: int) -> torch.Tensor:
    pairs = torch.stack([packed & 15, packed >> 4], dim=-1)
    return pairs.reshape(*packed.shape[:-1], -1)[..., :channels]
