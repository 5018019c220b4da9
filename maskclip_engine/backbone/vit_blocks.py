"""The parts of open_clip's ViT image tower that every dense mode runs unchanged.

Patch embedding (with positional embeddings resized to any grid), the
transformer blocks before the ones a dense mode rewrites, and the attention
inside them. The blocks are written out (:func:`transformer_block`) so that
attention is chosen by :func:`attend`: on a CPU in bf16, blocks of query rows
through bf16 batched matrix products, with scores and softmax in bf16 as
PyTorch's own ``MultiheadAttention`` computes them in bf16; it takes about a
third less time at ViT-B-16's 1,177 tokens on 2 cores than PyTorch's CPU
flash-attention kernel, which keeps scores in float32. Elsewhere (float32,
CUDA) it is ``scaled_dot_product_attention``.

Tokens are batch first, ``[B, 1 + h * w, width]``, the class token first and
patches in row-major order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

from maskclip_engine.errors import InvalidImageError

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


def check_pixels(pixels: torch.Tensor, stride: int) -> tuple[int, int]:
    """The feature grid ``(rows, cols)`` of a ``[B, 3, H, W]`` batch whose sides are multiples of ``stride``."""
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise InvalidImageError(f"pixels must be a [B, 3, H, W] batch, got shape {tuple(pixels.shape)}.")
    height, width = pixels.shape[-2:]
    if height < stride or width < stride or height % stride or width % stride:
        raise InvalidImageError(
            f"pixel batch of {height}x{width} must have sides that are positive multiples of {stride} "
            "(the model's patch size); resize or pad it first."
        )
    return height // stride, width // stride


def embed_tokens(visual: VisionTransformer, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """The tokens entering the first block, ``[B, 1 + h * w, width]``, and the patch grid ``(h, w)``."""
    grid = check_pixels(pixels, visual.patch_size[0])
    x = visual.conv1(pixels).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(pixels.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + interpolate_positional_embedding(visual, grid).to(x.dtype)
    return visual.ln_pre(x), grid


def run_block(visual: VisionTransformer, index: int, x: torch.Tensor) -> torch.Tensor:
    """Block ``index`` of the tower on batch-first tokens, whatever layout the tower itself uses."""
    block = visual.transformer.resblocks[index]
    if visual.transformer.batch_first:
        return transformer_block(block, x)
    return block(x.transpose(0, 1)).transpose(0, 1)


def transformer_block(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One of open_clip's ``ResidualAttentionBlock`` on batch-first tokens ``[B, N, C]``, attention by :func:`attend`.

    The same computation as ``block(x)``; written out so the attention is ours
    (``nn.MultiheadAttention`` takes a fused path of its own when its weights
    are stored in bf16, with other rounding). Other block types run as they are.
    """
    if not _plain_block(block):
        return block(x)
    q, k, v = heads_qkv(block, block.ln_1(x))
    return _finish_block(block, x, attend(q, k, v))


def transformer_block_with_attention(block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`transformer_block` with its attention weights averaged over heads, ``[B, N, N]``.

    The weights are computed explicitly (``softmax(q k^T / sqrt(d))``) and the
    block's output from them, so the returned weights are the ones it used.
    """
    if not _plain_block(block):
        raise InvalidImageError(f"{type(block).__name__} blocks do not expose their attention weights.")
    q, k, v = heads_qkv(block, block.ln_1(x))
    weights = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
    return _finish_block(block, x, weights @ v), weights.mean(dim=1)


def heads_qkv(block: torch.nn.Module, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A block's queries, keys and values of normalised tokens ``y`` ``[B, N, C]``, per head: ``[B, H, N, d]``."""
    attn = block.attn
    batch, tokens, width = y.shape
    heads = attn.num_heads
    qkv = F.linear(y, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    return q, k, v


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, d]`` back to ``[B, N, H * d]``."""
    batch, heads, tokens, dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * dim)


def _plain_block(block: torch.nn.Module) -> bool:
    attn = getattr(block, "attn", None)
    return (
        isinstance(block, ResidualAttentionBlock)
        and isinstance(attn, torch.nn.MultiheadAttention)
        and attn._qkv_same_embed_dim
        and attn.bias_k is None
        and not hasattr(block, "ln_1_kv")
    )


def _finish_block(block: torch.nn.Module, x: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
    x = x + block.ls_1(block.attn.out_proj(merge_heads(mixed)))
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


def to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch tokens ``[B, h * w, D]`` (row-major) as a map ``[B, D, h, w]``."""
    batch, _, dim = tokens.shape
    return tokens.transpose(1, 2).reshape(batch, dim, grid[0], grid[1])


def project_patches(visual: VisionTransformer, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patch tokens ``[B, h * w, width]`` through ``ln_post`` and the projection, as a map ``[B, D, h, w]``."""
    return to_map(visual.ln_post(patches) @ visual.proj, grid)
