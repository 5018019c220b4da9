"""MaskCLIP dense features: per-location embeddings in CLIP's joint space.

CLIP pools its image tower into one vector. MaskCLIP keeps every location
instead and reads it out through the same projection, so each location can be
compared with text embeddings:

* ViT: all blocks run as usual except the last, where the query-key mixing is
  dropped and each token keeps only its own value path (residual and MLP kept),
  then ``ln_post`` and the projection are applied to every patch token.
* ModifiedResNet: the attention pool's value and output projections become
  1x1 convolutions over the layer4 map (its positional embedding is dropped).

Both also return the keys of that last attention, used by key smoothing.

Later training-free methods change the ViT's last block (``dense_mode``):

* ``sclip``: attention ``softmax(q q^T / sqrt(d)) + softmax(k k^T / sqrt(d))``;
* ``clearclip``: attention ``softmax(q q^T / sqrt(d))``;
* ``naclip``: attention ``softmax(k k^T / sqrt(d) + G)`` with ``G`` a Gaussian of
  the patch-grid distance (sigma 5 patches).

Each replaces the block's output by its attention output alone (after the
output projection): no residual, no MLP. ``scclip`` and ``sfp`` also resolve
outlier tokens and aggregate patches by the affinities of middle blocks
(:mod:`maskclip_engine.dense.calibrated`).

The blocks before the last run as open_clip defines them
(:mod:`maskclip_engine.backbone.vit_blocks`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer

from maskclip_engine.backbone.vit_blocks import check_pixels, embed_tokens, project_patches, run_block, to_map
from maskclip_engine.config import DENSE_MODES
from maskclip_engine.dense.calibrated import CALIBRATED_MODES, calibrated_dense
from maskclip_engine.errors import InvalidOptionError

NACLIP_SIGMA = 5.0


def vit_dense(
    visual: VisionTransformer, pixels: torch.Tensor, mode: str = "maskclip"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense features ``[B, D, h, w]`` and last-block keys ``[B, width, h, w]`` of a ViT."""
    if mode in CALIBRATED_MODES:
        return calibrated_dense(visual, pixels, mode)
    x, grid = embed_tokens(visual, pixels)
    blocks = visual.transformer.resblocks
    for index in range(len(blocks) - 1):
        x = run_block(visual, index, x)

    last = blocks[-1]
    attn = last.attn
    q, k, v = F.linear(last.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    if mode == "maskclip":
        x = x + last.ls_1(attn.out_proj(v))
        x = x + last.ls_2(last.mlp(last.ln_2(x)))
    else:
        x = attn.out_proj(_self_correlation(q, k, v, attn.num_heads, mode, grid))
    keys = attn.out_proj(k)
    return project_patches(visual, x[:, 1:], grid), to_map(keys[:, 1:], grid)


def _self_correlation(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mode: str, grid: tuple[int, int]
) -> torch.Tensor:
    """Multi-head attention of the training-free modes over ``[B, N, C]`` projections (class token first)."""
    batch, tokens, width = q.shape
    q, k, v = (t.reshape(batch, tokens, heads, width // heads).transpose(1, 2) for t in (q, k, v))
    scale = (width // heads) ** -0.5
    if mode == "sclip":
        weights = torch.softmax(q @ q.transpose(-2, -1) * scale, -1) + torch.softmax(
            k @ k.transpose(-2, -1) * scale, -1
        )
    elif mode == "clearclip":
        weights = torch.softmax(q @ q.transpose(-2, -1) * scale, -1)
    elif mode == "naclip":
        bias = neighbourhood_bias(grid, NACLIP_SIGMA, q.device).to(q.dtype)
        weights = torch.softmax(k @ k.transpose(-2, -1) * scale + bias, -1)
    else:
        raise InvalidOptionError(f"dense_mode {mode!r} is not one of {', '.join(DENSE_MODES)}.")
    return (weights @ v).transpose(1, 2).reshape(batch, tokens, width)


def neighbourhood_bias(grid: tuple[int, int], sigma: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """NACLIP's ``[1 + N, 1 + N]`` attention bias: ``exp(-d^2 / (2 sigma^2))`` for patches ``d`` patches apart.

    The class token (index 0) gets no bias to or from anything.
    """
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], device=device), torch.arange(grid[1], device=device), indexing="ij"
    )
    points = torch.stack([rows.flatten(), cols.flatten()], 1).float()
    gaussian = torch.exp(-torch.cdist(points, points).pow(2) / (2 * sigma**2))
    bias = torch.zeros(gaussian.shape[0] + 1, gaussian.shape[1] + 1, device=device)
    bias[1:, 1:] = gaussian
    return bias


def resnet_dense(visual: ModifiedResNet, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense features ``[B, D, h, w]`` and attention-pool keys ``[B, C, h, w]`` of a ModifiedResNet."""
    grid = check_pixels(pixels, 32)
    x = visual.stem(pixels)
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
    tokens = x.flatten(2).transpose(1, 2)
    pool = visual.attnpool
    features = pool.c_proj(pool.v_proj(tokens))
    keys = pool.k_proj(tokens)
    return to_map(features, grid), to_map(keys, grid)


def dense_features(
    visual: torch.nn.Module, pixels: torch.Tensor, mode: str = "maskclip"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch on the image tower: features and keys as in :func:`vit_dense`."""
    if mode not in DENSE_MODES:
        raise InvalidOptionError(f"dense_mode {mode!r} is not one of {', '.join(DENSE_MODES)}.")
    if isinstance(visual, VisionTransformer):
        return vit_dense(visual, pixels, mode)
    if isinstance(visual, ModifiedResNet):
        if mode != "maskclip":
            raise InvalidOptionError(
                f"dense_mode {mode!r} changes a ViT's last attention block; ResNet models support 'maskclip' only."
            )
        return resnet_dense(visual, pixels)
    raise TypeError(f"no dense path for {type(visual).__name__}")
