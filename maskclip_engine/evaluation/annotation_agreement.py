"""How much of a proposal an annotator kept: a submitted label map compared with the one the task was proposed.

Both maps are ``HxW`` integer arrays of label indices, ``-1`` where nothing
is drawn. The numbers answer "how much did the annotator have to fix":

- ``per_label``: IoU of each label drawn in either map (a label in one map
  only scores 0);
- ``mean_iou``: their mean; 1.0 when neither map draws anything (nothing
  needed fixing);
- ``pixel_accuracy``: share of all pixels whose label (or "nothing") is the same;
- ``kept``: share of the proposal's labelled pixels the annotation left with
  the same label; 1.0 for an empty proposal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class MaskAgreement:
    mean_iou: float
    pixel_accuracy: float
    kept: float
    per_label: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean_iou": self.mean_iou,
            "pixel_accuracy": self.pixel_accuracy,
            "kept": self.kept,
            "per_label": dict(self.per_label),
        }


def compare_label_maps(proposal: np.ndarray, annotation: np.ndarray, names: Sequence[str]) -> MaskAgreement:
    """Agreement of ``annotation`` with ``proposal`` (same shape); ``names[i]`` names label index ``i``."""
    proposal, annotation = np.asarray(proposal), np.asarray(annotation)
    if proposal.shape != annotation.shape or proposal.ndim != 2:
        raise ValueError(f"label maps must be 2-D and of one shape, not {proposal.shape} and {annotation.shape}")
    if proposal.size == 0:
        raise ValueError("label maps must hold at least one pixel")
    for grid in (proposal, annotation):
        if grid.min() < -1 or grid.max() >= len(names):
            raise ValueError(f"label indices must lie in -1..{len(names) - 1}, the {len(names)} names given")
    same = proposal == annotation
    # One bincount over (proposal, annotation) pairs gives every intersection and area at once: a webhook's
    # job over a multi-megapixel image stays a few array passes, whatever the label count.
    count = len(names) + 1  # index 0 is "nothing drawn"
    pairs = np.bincount(((proposal + 1) * count + (annotation + 1)).ravel(), minlength=count * count)
    table = pairs.reshape(count, count)
    per_label: dict[str, float] = {}
    for index, name in enumerate(names, start=1):
        inter = table[index, index]
        union = table[index, :].sum() + table[:, index].sum() - inter
        if union > 0:
            per_label[str(name)] = round(float(inter / union), 6)
    labelled = int(table[1:, :].sum())
    kept = float(np.trace(table[1:, 1:]) / labelled) if labelled else 1.0
    mean = float(np.mean(list(per_label.values()))) if per_label else 1.0
    return MaskAgreement(round(mean, 6), round(float(same.mean()), 6), round(kept, 6), per_label)
