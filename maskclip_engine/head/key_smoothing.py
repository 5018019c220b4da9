"""Key smoothing (KS): each location's class probabilities become a key-similarity weighted sum of all
locations' probabilities, so locations the last attention layer sees as alike agree with each other.

Two variants:

* ``cosine`` (the product's default, the paper's definition): weights are the
  cosine similarities of per-location L2-normalised keys, and the result is
  clipped at zero and renormalised to probabilities (:func:`renormalised`).
* ``released`` (what MaskCLIP's released code computes, behind its published
  "+KS" numbers): keys normalised per channel over all locations, raw ``W p``
  where the top probability is below a threshold; only its argmax means
  anything.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def renormalised(scores: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Scores ``[C, ...]`` clipped at zero and scaled to sum to one over classes at each location.

    The argmax is unchanged wherever some class scores above zero; a location
    where none does (dissimilar neighbours outweigh everything) takes
    ``fallback``'s values rather than an arbitrary answer.
    """
    positive = scores.clamp_min(0)
    total = positive.sum(dim=0, keepdim=True)
    return torch.where(total <= 1e-12, fallback, positive / total.clamp_min(1e-12))


def key_smoothing(probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The paper's KS: ``p'_i = sum_j cos(k_i, k_j) p_j`` over all locations, renormalised per location.

    ``probs`` is ``[C, h, w]``, ``keys`` ``[K, h, w]``. The weights are cosine
    similarities of per-location L2-normalised keys. The result is clipped at
    zero and renormalised to sum to one per location (:func:`renormalised`):
    the argmax is that of the plain weighted sum, and the values stay
    probabilities so the background threshold keeps its meaning.
    """
    flat_keys = F.normalize(keys.flatten(1).float(), dim=0)  # [K, N]: each location's key has unit length
    weights = flat_keys.T @ flat_keys  # [N, N], symmetric
    flat = probs.flatten(1)
    return renormalised(flat @ weights, flat).reshape(probs.shape)


def key_smoothing_released(probs: torch.Tensor, keys: torch.Tensor, threshold: float = 1.0) -> torch.Tensor:
    """KS as MaskCLIP's released code computes it: raw ``W p`` scores, not probabilities.

    Keys ``[K, h, w]`` are L2-normalised per channel over all locations (the
    released code normalises ``[N, L, C]`` keys along dim 1, the locations),
    ``W = k k^T`` over locations, and ``p'_i = sum_j W_ij p_j`` replaces ``p_i``
    wherever the top probability is below ``threshold``; elsewhere ``p_i``
    stays. No clipping, no renormalisation: only the argmax is meaningful.
    """
    flat_keys = F.normalize(keys.flatten(1).float(), dim=1)  # [K, N]: each channel has unit length over locations
    weights = flat_keys.T @ flat_keys  # [N, N], symmetric, so p @ W is W p per class
    flat = probs.flatten(1)
    smoothed = torch.where(flat.amax(dim=0, keepdim=True) < threshold, flat @ weights, flat)
    return smoothed.reshape(probs.shape)
