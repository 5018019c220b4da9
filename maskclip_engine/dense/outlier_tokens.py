"""Outlier tokens: the few patch tokens of a ViT's late blocks that carry global information, not their patch's.

Late blocks of CLIP's ViT write image-wide information into a handful of
patch tokens (they have very large norms and attend to everything); dense
features taken there are wrong for those patches and leak into their
neighbours through attention. SC-CLIP and SFP find them at the input of the
last block and replace each by its neighbours before anything else reads them.

* :func:`lof_outliers` (SC-CLIP): a local-outlier-factor score on the tokens'
  squared distances; the top ``contamination`` fraction are outliers.
* :func:`attention_outliers` (SFP): patches the class token attends to more
  than they attend to themselves, at most ``limit`` of them.
* :func:`fill_outliers`: each outlier becomes the mean of its non-outlier
  8-neighbours on the patch grid.

Tokens are ``[B, N, C]`` patch rows in row-major grid order (row ``i // cols``,
column ``i % cols``); every function works on any grid shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from maskclip_engine.errors import InvalidOptionError


def lof_outliers(tokens: torch.Tensor, neighbours: int = 30, contamination: float = 0.05) -> torch.Tensor:
    """Outlier mask ``[B, N]`` by a local-outlier-factor score on squared Euclidean distances.

    ``d_k(p)`` is a token's squared distance to its ``neighbours``-th nearest
    other token; its score is the mean, over those nearest tokens ``o``, of
    ``d_k(p) / d_k(o)`` (how much sparser ``p``'s neighbourhood is than its
    neighbours' own). Tokens scoring above the ``1 - contamination`` quantile
    of their image's scores are outliers. Computed in float32.
    """
    batch, count, _ = tokens.shape
    if count < 2:
        return torch.zeros(batch, count, dtype=torch.bool, device=tokens.device)
    k = min(neighbours, count - 1)
    x = tokens.float()
    distances = torch.cdist(x, x).pow(2)
    distances.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))  # a token is not its own neighbour
    nearest, index = distances.topk(k, dim=-1, largest=False)
    k_distance = nearest[..., -1]
    neighbour_k_distance = torch.gather(k_distance, 1, index.flatten(1)).view(batch, count, k)
    scores = (k_distance[..., None] / neighbour_k_distance.clamp_min(1e-12)).mean(dim=-1)
    threshold = torch.quantile(scores, 1.0 - contamination, dim=1, keepdim=True)
    return scores > threshold


def attention_outliers(attention: torch.Tensor, ratio: float = 1.5, limit: int = 10) -> torch.Tensor:
    """Outlier mask ``[B, N]`` of the patches from a block's head-averaged attention ``[B, 1 + N, 1 + N]``.

    A patch is a candidate when ``ratio`` times the class token's attention to
    it exceeds its attention to itself; of the candidates, the ``limit`` the
    class token attends to most are outliers.
    """
    cls_to_patch = attention[:, 0, 1:].float()
    self_attention = attention.diagonal(dim1=-2, dim2=-1)[:, 1:].float()
    candidates = ratio * cls_to_patch > self_attention
    ranked = torch.where(candidates, cls_to_patch, torch.full_like(cls_to_patch, -1.0))
    top = ranked.topk(min(limit, ranked.shape[1]), dim=1).indices
    chosen = torch.zeros_like(candidates).scatter_(1, top, True)
    return chosen & candidates


def fill_outliers(
    tokens: torch.Tensor, outliers: torch.Tensor, grid: tuple[int, int], isolated: str = "keep"
) -> torch.Tensor:
    """``tokens`` ``[B, N, C]`` with each outlier replaced by the mean of its non-outlier 8-neighbours.

    Cells beyond the grid's edge are missing, not zero. An outlier with no
    non-outlier neighbour is kept as it is (``isolated="keep"``, SC-CLIP) or
    zeroed (``"zero"``, SFP).
    """
    if isolated not in ("keep", "zero"):
        raise InvalidOptionError(f"isolated must be 'keep' or 'zero', got {isolated!r}.")
    batch, count, channels = tokens.shape
    rows, cols = grid
    if count != rows * cols:
        raise InvalidOptionError(f"{count} tokens do not fill a {rows}x{cols} grid.")
    if not bool(outliers.any()):
        return tokens
    x = tokens.float().transpose(1, 2).reshape(batch, channels, rows, cols)
    good = (~outliers).float().view(batch, 1, rows, cols)
    ring = torch.ones(1, 1, 3, 3, device=tokens.device)
    ring[0, 0, 1, 1] = 0
    summed = F.conv2d((x * good).reshape(batch * channels, 1, rows, cols), ring, padding=1)
    summed = summed.view(batch, channels, rows * cols).transpose(1, 2)
    counts = F.conv2d(good, ring, padding=1).view(batch, rows * cols, 1)
    mean = summed / counts.clamp_min(1)
    fallback = tokens.float() if isolated == "keep" else torch.zeros_like(mean)
    replacement = torch.where(counts > 0, mean, fallback)
    return torch.where(outliers[..., None], replacement, tokens.float()).to(tokens.dtype)
