"""Task scores to sort by: which image's annotation would teach the student most.

Open-source Label Studio orders tasks by the Data Manager's *Prediction
score* column (each task's prediction-level ``score``), so a proposal's score
is what decides the labelling order there: sorted ascending, the least certain
images come first. Each candidate reads the refined class probabilities on the
feature grid (``[C, h, w]``, each location summing to one):

* ``top1``: the mean top-1 probability;
* ``margin``: the mean gap between the top-1 and top-2 probabilities;
* ``entropy``: one minus the mean entropy, normalised by ``log C``;
* ``class_min``: the least confident predicted label, each label's confidence
  being its mean top-1 probability where it wins (labels winning under 1% of
  the grid are left out).

Lower means "label me first" for every one. ``benchmarks/bench_active_learning.py``
measures which one picks the tasks that teach the student most.
"""

from __future__ import annotations

import math

import torch

KINDS: tuple[str, ...] = ("top1", "margin", "entropy", "class_min")
MIN_AREA = 0.01


def acquisition_scores(probs: torch.Tensor) -> dict[str, float]:
    """Every candidate score of one image's grid probabilities ``[C, h, w]``."""
    flat = probs.flatten(1).float()
    classes, cells = flat.shape
    if classes == 1:
        top = flat[0]
        return {"top1": float(top.mean()), "margin": float(top.mean()), "entropy": 1.0, "class_min": float(top.mean())}
    best = flat.topk(2, dim=0).values
    entropy = -(flat.clamp_min(1e-12) * flat.clamp_min(1e-12).log()).sum(0) / math.log(classes)
    winner = flat.argmax(0)
    confidences = [
        float(best[0][winner == c].mean())
        for c in range(classes)
        if int((winner == c).sum()) >= max(1, MIN_AREA * cells)
    ]
    return {
        "top1": float(best[0].mean()),
        "margin": float((best[0] - best[1]).mean()),
        "entropy": float(1 - entropy.mean()),
        "class_min": min(confidences) if confidences else float(best[0].mean()),
    }
