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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer

from .errors import InvalidImageError


def interpolate_positional_embedding(visual: VisionTransformer, grid: tuple[int, int]) -> torch.Tensor:
    """Positional embeddings for a ``grid`` of patches: ``[1 + gh * gw, width]``.

    The class position is kept as is; the patch positions are resized bicubically.
    """
    pos = visual.positional_embedding
    train_h, train_w = visual.grid_size
    if (train_h, train_w) == tuple(grid):
        return pos
    cls_pos, patch_pos = pos[:1], pos[1:]
    width = pos.shape[-1]
    patch_pos = patch_pos.reshape(1, train_h, train_w, width).permute(0, 3, 1, 2).float()
    patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], width).to(pos.dtype)
    return torch.cat([cls_pos, patch_pos], dim=0)


def _check_pixels(pixels: torch.Tensor, stride: int) -> tuple[int, int]:
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise InvalidImageError(f"pixels must be a [B, 3, H, W] batch, got shape {tuple(pixels.shape)}.")
    height, width = pixels.shape[-2:]
    if height < stride or width < stride or height % stride or width % stride:
        raise InvalidImageError(
            f"pixel batch of {height}x{width} must have sides that are positive multiples of {stride} "
            "(the model's patch size); resize or pad it first."
        )
    return height // stride, width // stride


def vit_dense(visual: VisionTransformer, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense features ``[B, D, h, w]`` and last-block keys ``[B, width, h, w]`` of a ViT."""
    grid = _check_pixels(pixels, visual.patch_size[0])
    batch = pixels.shape[0]
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(batch, 1, -1)
    x = torch.cat([cls, x], dim=1) + interpolate_positional_embedding(visual, grid).to(x.dtype)
    x = visual.ln_pre(x)

    transformer = visual.transformer
    blocks = transformer.resblocks
    if not transformer.batch_first:
        x = x.transpose(0, 1)
    for block in blocks[:-1]:
        x = block(x)
    if not transformer.batch_first:
        x = x.transpose(0, 1)

    last = blocks[-1]
    attn = last.attn
    _, k, v = F.linear(last.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    x = x + last.ls_1(attn.out_proj(v))
    x = x + last.ls_2(last.mlp(last.ln_2(x)))
    keys = attn.out_proj(k)

    features = visual.ln_post(x[:, 1:]) @ visual.proj
    return _to_map(features, grid), _to_map(keys[:, 1:], grid)


def resnet_dense(visual: ModifiedResNet, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense features ``[B, D, h, w]`` and attention-pool keys ``[B, C, h, w]`` of a ModifiedResNet."""
    grid = _check_pixels(pixels, 32)
    x = visual.stem(pixels)
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
    tokens = x.flatten(2).transpose(1, 2)
    pool = visual.attnpool
    features = pool.c_proj(pool.v_proj(tokens))
    keys = pool.k_proj(tokens)
    return _to_map(features, grid), _to_map(keys, grid)


def _to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    batch, _, dim = tokens.shape
    return tokens.transpose(1, 2).reshape(batch, dim, grid[0], grid[1])


def dense_features(visual: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch on the image tower: features and keys as in :func:`vit_dense`."""
    if isinstance(visual, VisionTransformer):
        return vit_dense(visual, pixels)
    if isinstance(visual, ModifiedResNet):
        return resnet_dense(visual, pixels)
    raise TypeError(f"no dense path for {type(visual).__name__}")
