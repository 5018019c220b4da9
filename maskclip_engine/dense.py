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

Later training-free methods change only the ViT's last block (``dense_mode``):

* ``sclip``: attention ``softmax(q q^T / sqrt(d)) + softmax(k k^T / sqrt(d))``;
* ``clearclip``: attention ``softmax(q q^T / sqrt(d))``;
* ``naclip``: attention ``softmax(k k^T / sqrt(d) + G)`` with ``G`` a Gaussian of
  the patch-grid distance (sigma 5 patches).

Each replaces the block's output by its attention output alone (after the
output projection): no residual, no MLP.

The blocks before the last run as open_clip defines them, written out here
(:func:`transformer_block`) so that attention is chosen by :func:`attend`: on a
CPU in bf16, blocks of query rows through bf16 batched matrix products, with
scores and softmax in bf16 as PyTorch's own ``MultiheadAttention`` computes them
in bf16; it takes about a third less time at ViT-B-16's 1,177 tokens on 2
cores than PyTorch's CPU flash-attention kernel, which keeps scores in float32. Elsewhere
(float32, CUDA) it is ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

from .config import DENSE_MODES
from .errors import InvalidImageError, InvalidOptionError

NACLIP_SIGMA = 5.0
ROW_BLOCK_ELEMENTS = 1 << 21


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


def vit_dense(
    visual: VisionTransformer, pixels: torch.Tensor, mode: str = "maskclip"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense features ``[B, D, h, w]`` and last-block keys ``[B, width, h, w]`` of a ViT."""
    grid = _check_pixels(pixels, visual.patch_size[0])
    batch = pixels.shape[0]
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(batch, 1, -1)
    x = torch.cat([cls, x], dim=1) + interpolate_positional_embedding(visual, grid).to(x.dtype)
    x = visual.ln_pre(x)

    transformer = visual.transformer
    blocks = transformer.resblocks
    if transformer.batch_first:
        for block in blocks[:-1]:
            x = transformer_block(block, x)
    else:
        x = x.transpose(0, 1)
        for block in blocks[:-1]:
            x = block(x)
        x = x.transpose(0, 1)

    last = blocks[-1]
    attn = last.attn
    q, k, v = F.linear(last.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    if mode == "maskclip":
        x = x + last.ls_1(attn.out_proj(v))
        x = x + last.ls_2(last.mlp(last.ln_2(x)))
    else:
        x = attn.out_proj(_self_correlation(q, k, v, attn.num_heads, mode, grid))
    keys = attn.out_proj(k)

    features = visual.ln_post(x[:, 1:]) @ visual.proj
    return _to_map(features, grid), _to_map(keys[:, 1:], grid)


def transformer_block(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One of open_clip's ``ResidualAttentionBlock`` on batch-first tokens ``[B, N, C]``, attention by :func:`attend`.

    The same computation as ``block(x)``; written out so the attention is ours
    (``nn.MultiheadAttention`` takes a fused path of its own when its weights
    are stored in bf16, with other rounding). Other block types run as they are.
    """
    attn = getattr(block, "attn", None)
    if (
        not isinstance(block, ResidualAttentionBlock)
        or not isinstance(attn, torch.nn.MultiheadAttention)
        or not attn._qkv_same_embed_dim
        or attn.bias_k is not None
        or hasattr(block, "ln_1_kv")
    ):
        return block(x)
    batch, tokens, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    mixed = attend(q, k, v).transpose(1, 2).reshape(batch, tokens, width)
    x = x + block.ls_1(attn.out_proj(mixed))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention of ``[B, H, N, d]`` queries, keys and values (scale ``d ** -0.5``)."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        return _attend_in_row_blocks(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def _attend_in_row_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """:func:`attend` a block of query rows at a time; a block's scores hold about ``ROW_BLOCK_ELEMENTS`` values."""
    batch, heads, tokens, dim = q.shape
    q = (q * dim**-0.5).contiguous().view(batch * heads, tokens, dim)
    keys_t = k.transpose(-2, -1).contiguous().view(batch * heads, dim, tokens)
    v = v.contiguous().view(batch * heads, tokens, dim)
    out = torch.empty_like(q)
    rows = min(tokens, max(16, ROW_BLOCK_ELEMENTS // (batch * heads * tokens)))
    for start in range(0, tokens, rows):
        scores = torch.bmm(q[:, start : start + rows], keys_t)
        torch.bmm(torch.softmax(scores, dim=-1), v, out=out[:, start : start + rows])
    return out.view(batch, heads, tokens, dim)


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
