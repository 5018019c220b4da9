"""SC-CLIP and SFP: dense features from a frozen ViT, calibrated by its own middle blocks.

Both methods keep MaskCLIP's premise (no training, no other model, features
independent of the labels) and change how the last block is reached and run.
Notation: ``B_i`` is the output of block ``i`` (the raw residual stream, class
token first), ``P(.)`` its patch rows, ``cos`` the patches' cosine-similarity
matrix, ``thr(S)`` sets entries below 0.4 to 0, ``Agg(S, X)`` is
``S / (row sum + 1e-6) @ X`` and ``G(S) = 3 (S - mean of all entries)`` with
its negative entries set to ``-inf``. For ViT-B/16 (12 blocks):

1. Blocks 0-10 run as usual.
2. Outlier patches of ``B_10`` are found: ``scclip`` by a local outlier
   factor on the tokens, ``sfp`` from block 10's attention
   (:mod:`maskclip_engine.dense.outlier_tokens`); in ``B_10`` and ``B_8`` each is
   replaced by its non-outlier neighbours.
3. ``M = cos(P(B_8))``; ``X = Agg(thr(M), P(B_10))``.
4. The last block's attention only (no residual, no MLP), with ``q, k, v`` of
   ``ln_1(X)``: ``scclip`` averages ``softmax(G(M))`` and ``softmax(k k^T / sqrt(d))``;
   ``sfp`` averages ``softmax(k k^T / sqrt(d))``, ``softmax(q q^T / sqrt(d))`` and
   ``softmax(G(thr(M)))``. Its output (after ``out_proj``) plus 0.3 of ``B_10``'s
   class token is ``X``.
5. ``A = thr(cos(P(B_3)))``; ``X = Agg(A, X)``.
6. A second branch runs the sum of blocks 3-9, ``F``, through the last block's
   attention (``scclip``: step 4's, with ``F``'s own keys; ``sfp``:
   ``softmax(G(thr(M)))`` alone), adds 0.3 of ``F``'s class token and is
   aggregated by ``A`` too: ``Y``.
7. Features: ``ln_post(X + Y)`` through the projection.

Facts from the official code of both methods (SuleBai/SC-CLIP, Kimsure/SFP),
written here from their description, not copied. Where that code indexes the
patch grid as if it were square (outlier neighbours), this module uses the
real row-major grid, so any input size is right.

Keys for key smoothing and the smart tools are the last block's keys on the
main branch (``out_proj`` of ``k`` in step 4). A patch SFP zeroes has no
affinity to anything and takes no attention from ``G`` (the official code
turns the whole image into NaN there; see :func:`softmax_rows`).

Other depths: :func:`layer_plan`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer

from maskclip_engine.backbone.vit_blocks import (
    embed_tokens,
    heads_qkv,
    merge_heads,
    project_patches,
    run_block,
    to_map,
    transformer_block_with_attention,
)
from maskclip_engine.dense.outlier_tokens import attention_outliers, fill_outliers, lof_outliers
from maskclip_engine.errors import InvalidOptionError

CALIBRATED_MODES: tuple[str, ...] = ("scclip", "sfp")  # RECIPES below says how they differ
AFFINITY_THRESHOLD = 0.4
AFFINITY_SHARPNESS = 3.0
ROW_SUM_EPS = 1e-6
REFERENCE_DEPTH = 12
MIN_DEPTH = 6


@dataclass(frozen=True)
class LayerPlan:
    """Which blocks each step reads, 0-based (ViT-B/16's 12 blocks: 8, 3, 3-9, class weight 0.3).

    ``deep`` gives the affinity that aggregates the last block's input,
    ``shallow`` the one that aggregates both branches' outputs, and the blocks
    ``fused_first`` to ``fused_last`` (inclusive) are summed for the second
    branch. Outliers are always found at the last block's input.
    """

    deep: int = 8
    shallow: int = 3
    fused_first: int = 3
    fused_last: int = 9
    cls_weight: float = 0.3


# The plans the methods' authors published, by depth: ViT-B/16's, and the ViT-L/14 plan of SC-CLIP's first
# release (blocks 16, 6 and 8-18, class weight 0.1; SFP publishes none and shares SC-CLIP's skeleton).
PUBLISHED_PLANS: dict[int, LayerPlan] = {
    12: LayerPlan(),
    24: LayerPlan(deep=16, shallow=6, fused_first=8, fused_last=18, cls_weight=0.1),
}


def layer_plan(depth: int) -> LayerPlan:
    """The plan for a ViT of ``depth`` blocks.

    A published plan where there is one (12 and 24 blocks); otherwise
    ViT-B/16's block indices scaled by ``depth / 12`` and rounded (for 24 that
    rule would give 16, 6 and 6-18). Outliers are always found at the last
    block's input. Towers with fewer than ``MIN_DEPTH`` blocks have no room for
    the steps and are refused.
    """
    if depth in PUBLISHED_PLANS:
        return PUBLISHED_PLANS[depth]
    if depth < MIN_DEPTH:
        raise InvalidOptionError(
            f"dense modes {' and '.join(CALIBRATED_MODES)} need a ViT of at least {MIN_DEPTH} blocks "
            f"(they read blocks 3, 8 and 3-9 of 12, scaled by depth); this one has {depth}. "
            "Use 'naclip' or 'maskclip' with it."
        )

    def scaled(index: int) -> int:
        return int(index * depth / REFERENCE_DEPTH + 0.5)

    last_before_outliers = depth - 3  # block depth - 2 gives the last block's input
    return LayerPlan(
        deep=min(scaled(8), last_before_outliers),
        shallow=scaled(3),
        fused_first=scaled(3),
        fused_last=min(scaled(9), last_before_outliers),
    )


@dataclass(frozen=True)
class Recipe:
    """What distinguishes the two methods: the outlier detector, what becomes of an outlier with no usable
    neighbour, whether ``G`` reads the thresholded affinities, and the softmax terms each branch averages
    (``guide`` is ``softmax(G)``, ``kk`` and ``qq`` the key-key and query-query softmaxes)."""

    detector: str  # "lof" or "attention"
    isolated: str  # "keep" or "zero"
    guide_thresholded: bool
    main_terms: tuple[str, ...]
    fused_terms: tuple[str, ...]


RECIPES: dict[str, Recipe] = {
    "scclip": Recipe("lof", "keep", False, ("guide", "kk"), ("guide", "kk")),
    "sfp": Recipe("attention", "zero", True, ("kk", "qq", "guide"), ("guide",)),
}


def calibrated_dense(visual: VisionTransformer, pixels: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense features ``[B, D, h, w]`` and main-branch keys ``[B, width, h, w]`` in ``scclip`` or ``sfp`` mode."""
    if mode not in RECIPES:
        raise InvalidOptionError(f"{mode!r} is not one of {', '.join(CALIBRATED_MODES)}.")
    recipe = RECIPES[mode]
    x, grid = embed_tokens(visual, pixels)
    plan = layer_plan(len(visual.transformer.resblocks))
    x, kept, fused, attention = _middle_blocks(visual, x, plan, recipe.detector == "attention")

    patches = x[:, 1:]
    outliers = lof_outliers(patches) if attention is None else attention_outliers(attention)
    patches = fill_outliers(patches, outliers, grid, recipe.isolated)
    affinity = cosine_affinity(fill_outliers(kept[plan.deep][:, 1:], outliers, grid, recipe.isolated))
    thresholded = threshold_affinity(affinity)
    guide = softmax_rows(sharpened(thresholded if recipe.guide_thresholded else affinity))[:, None]

    last = visual.transformer.resblocks[-1]
    q, k, v = heads_qkv(last, last.ln_1(aggregate(thresholded, patches)))
    main = last.attn.out_proj(merge_heads(_attention(recipe.main_terms, q, k, guide) @ v))
    fused_q, fused_k, fused_v = heads_qkv(last, last.ln_1(fused[:, 1:]))
    side = last.attn.out_proj(merge_heads(_attention(recipe.fused_terms, fused_q, fused_k, guide) @ fused_v))
    main = main + plan.cls_weight * x[:, :1]
    side = side + plan.cls_weight * fused[:, :1]

    shallow = threshold_affinity(cosine_affinity(kept[plan.shallow][:, 1:]))
    out = aggregate(shallow, main) + aggregate(shallow, side)
    keys = last.attn.out_proj(merge_heads(k))
    return project_patches(visual, out, grid), to_map(keys, grid)


def _middle_blocks(
    visual: VisionTransformer, x: torch.Tensor, plan: LayerPlan, with_attention: bool
) -> tuple[torch.Tensor, dict[int, torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """Every block but the last: the last block's input, the outputs the plan keeps, the sum of its fused
    range, and (``with_attention``) the head-averaged attention of the block before the last."""
    depth = len(visual.transformer.resblocks)
    kept: dict[int, torch.Tensor] = {}
    fused = torch.zeros_like(x)
    attention = None
    for index in range(depth - 1):
        if with_attention and index == depth - 2:
            x, attention = transformer_block_with_attention(visual.transformer.resblocks[index], x)
        else:
            x = run_block(visual, index, x)
        if index in (plan.deep, plan.shallow):
            kept[index] = x
        if plan.fused_first <= index <= plan.fused_last:
            fused = fused + x
    return x, kept, fused, attention


def _attention(terms: tuple[str, ...], q: torch.Tensor, k: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
    """The mean of the named softmax terms over ``[B, H, N, d]`` queries and keys (``guide``: ``[B, 1, N, N]``)."""
    scale = q.shape[-1] ** -0.5
    parts = {
        "guide": lambda: guide,
        "kk": lambda: torch.softmax(k @ k.transpose(-2, -1) * scale, dim=-1),
        "qq": lambda: torch.softmax(q @ q.transpose(-2, -1) * scale, dim=-1),
    }
    return sum(parts[term]() for term in terms) / len(terms)


def cosine_affinity(tokens: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``[B, N, N]`` between tokens ``[B, N, C]``."""
    unit = F.normalize(tokens, dim=-1)
    return unit @ unit.transpose(-2, -1)


def threshold_affinity(affinity: torch.Tensor) -> torch.Tensor:
    """Affinities below 0.4 set to 0."""
    return torch.where(affinity < AFFINITY_THRESHOLD, torch.zeros_like(affinity), affinity)


def aggregate(affinity: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Each token becomes the affinity-weighted mean of all tokens: rows normalised to sum to one."""
    return (affinity / (affinity.sum(dim=-1, keepdim=True) + ROW_SUM_EPS)) @ tokens


def softmax_rows(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis; a row with no finite score gets zero weights, not NaN.

    Such a row is a patch SFP zeroed (an outlier without a usable neighbour):
    it has no affinity to any patch, itself included. In the official code its
    NaN spreads through every aggregation to the whole image.
    """
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def sharpened(affinity: torch.Tensor) -> torch.Tensor:
    """``3 (S - mean S)`` with negative entries at ``-inf``: attention scores that keep only above-average pairs."""
    centred = AFFINITY_SHARPNESS * (affinity - affinity.mean(dim=(-2, -1), keepdim=True))
    return centred.masked_fill(centred < 0, float("-inf"))
