"""How far a faster configuration's label map agrees with a float32 reference.

Pixels whose reference decision is a near-tie (the top two class
probabilities within ``margin`` of each other) are left out: there, any
rounding, in any precision, may pick either class, and neither answer is
more right. Agreement is the share of the remaining ("decided") pixels that
carry the same label in both maps.

The default margin, :data:`DEFAULT_MARGIN`, is 0.05. bf16 keeps 8
significant bits, so a ViT-B/16 backbone under bf16 autocast moves the cosine
logits a little (docs/performance.md has the measured spread). Label
probabilities are ``softmax(100 * logits)``, so a logit error ``e`` moves a
pair's log-odds by up to ``200 e`` and their probability margin near a tie by
up to ``tanh(100 e)``; 0.05 is where bf16's own rounding typically can flip a
decision, and leaves nearly the whole image in the measure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from maskclip_engine.errors import InvalidOptionError

if TYPE_CHECKING:
    from maskclip_engine.labels import LabelInput
    from maskclip_engine.segmenter import Segmenter

DEFAULT_MARGIN = 0.05


@dataclass(frozen=True)
class Agreement:
    """Counts of one comparison; ``fraction`` is agreeing / decided (1.0 when nothing is decided)."""

    agreeing: int
    decided: int
    total: int
    margin: float

    tied_agreeing: int = 0  # agreeing pixels among the near-ties (not counted in ``fraction``)
    # Prompt denoising dropped the same classes in both. When it did not, a class's best probability sat
    # at the 0.5 threshold (a class-level near-tie the pixel margin cannot see) and whole regions may flip.
    same_dropped: bool = True

    @property
    def fraction(self) -> float:
        return self.agreeing / self.decided if self.decided else 1.0

    @property
    def decided_fraction(self) -> float:
        """Share of all pixels that count: those whose reference decision is not a near-tie."""
        return self.decided / self.total if self.total else 0.0

    @property
    def raw_fraction(self) -> float:
        """Agreement over every pixel, near-ties included."""
        return (self.agreeing + self.tied_agreeing) / self.total if self.total else 1.0

    def __add__(self, other: Agreement) -> Agreement:
        """Pooled counts of two comparisons (same margin)."""
        return Agreement(
            self.agreeing + other.agreeing,
            self.decided + other.decided,
            self.total + other.total,
            self.margin,
            self.tied_agreeing + other.tied_agreeing,
            self.same_dropped and other.same_dropped,
        )


def top2_margin(probs: torch.Tensor) -> torch.Tensor:
    """``[C, H, W]`` probabilities to ``[H, W]`` top-1 minus top-2 (1 - top-1 with one class)."""
    if probs.shape[0] == 1:
        return 1.0 - probs[0]  # the only competitor is "nothing": never a tie unless the class is unsure
    top = probs.topk(2, dim=0).values
    return top[0] - top[1]


def upsampled_margin(grid_probs: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """Top-2 margin ``HxW float32`` of grid probabilities ``[C, h, w]`` upsampled as labels are (bilinear)."""
    up = F.interpolate(grid_probs[None].float(), size=shape, mode="bilinear", align_corners=False)[0]
    return top2_margin(up).cpu().numpy().astype(np.float32)


def label_agreement(
    reference: np.ndarray, candidate: np.ndarray, reference_margin: np.ndarray, margin: float = DEFAULT_MARGIN
) -> Agreement:
    """Agreement of two ``HxW`` label maps on the pixels where ``reference_margin > margin``."""
    if reference.shape != candidate.shape or reference.shape != reference_margin.shape:
        raise ValueError(
            f"label maps and margin must have one shape, got {reference.shape}, {candidate.shape} and "
            f"{reference_margin.shape}."
        )
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin}.")
    same = reference == candidate
    decided = reference_margin > margin
    return Agreement(
        agreeing=int((same & decided).sum()),
        decided=int(decided.sum()),
        total=int(reference.size),
        margin=float(margin),
        tied_agreeing=int((same & ~decided).sum()),
    )


def measure_agreement(
    reference: Segmenter,
    candidate: Segmenter,
    image: Any,
    labels: Sequence[LabelInput],
    margin: float = DEFAULT_MARGIN,
    **options: Any,
) -> Agreement:
    """Agreement of ``candidate.segment`` with ``reference.segment`` on one image.

    The reference (usually the same model in fp32) also gives each pixel's
    top-2 margin, from its refined label probabilities upsampled to the image.
    """
    if options.get("slide_refine") == "window" or options.get("pamr"):
        raise InvalidOptionError(
            "measure_agreement takes each pixel's margin from whole-image refinement without PAMR; "
            "per-window refinement and PAMR label from other maps, so measure with those options off."
        )
    expected, state = reference.segment_with_state(image, labels, **options)
    got = candidate.segment(image, labels, **options)
    shape = expected.label_map.shape
    counts = label_agreement(expected.label_map, got.label_map, upsampled_margin(state.probs, shape), margin)
    return dataclasses.replace(counts, same_dropped=expected.dropped == got.dropped)
