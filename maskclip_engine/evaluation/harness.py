"""The evaluation harness of the later training-free methods (SCLIP, ClearCLIP, NACLIP, SC-CLIP, SFP).

Their published numbers come from a head of their own, not MaskCLIP's: no
key smoothing or prompt denoising; each sliding window's cosine logits (one
map per class *name*, synonyms included) are upsampled bilinearly to the
window, averaged where windows overlap and resized to the original image;
then ``softmax(logit_scale * logits)`` runs over every name, a class takes
its best name's probability, classes whose argmax area is at most
``area_threshold`` of all non-background argmax area get probability 0 (VOC21
only), and pixels whose top probability is below ``prob_threshold`` go to class
0 (the background class, prompted with its own names). Each name is embedded
with CLIP's 80 ImageNet templates, not MaskCLIP's 85. Facts from the
methods' official evaluation code (docs/evaluation.md); the backbone is the
engine's, its features come through the segmenter's feature source.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from maskclip_engine.backbone.templates import TEMPLATE_SETS
from maskclip_engine.backbone.text import TextEmbedder
from maskclip_engine.errors import InvalidOptionError
from maskclip_engine.features.image_features import ImageFeatures
from maskclip_engine.labels import LabelSet
from maskclip_engine.segmenter import Segmenter


@dataclass(frozen=True)
class Harness:
    """The harness's head: temperature, the background probability threshold, VOC21's area threshold."""

    logit_scale: float = 40.0
    prob_threshold: float = 0.0
    area_threshold: float = 0.0
    background: bool = True  # class 0 is the background class (what prob_threshold sends pixels to)
    templates: str = "imagenet"  # a set of maskclip_engine.backbone.templates.TEMPLATE_SETS

    def __post_init__(self) -> None:
        if self.templates not in TEMPLATE_SETS:
            raise InvalidOptionError(f"harness templates {self.templates!r} is not one of {', '.join(TEMPLATE_SETS)}.")


def name_logits(features: ImageFeatures, text: torch.Tensor) -> torch.Tensor:
    """Per-name cosine logits ``[S, H, W]`` at the resized image's pixels: windows upsampled and averaged."""
    logits = torch.einsum("wdhk,sd->wshk", F.normalize(features.features, dim=1), text)
    canvas = logits.new_zeros((text.shape[0], *features.resized))
    count = logits.new_zeros(features.resized)
    for window, window_logits in zip(features.windows, logits):
        up = F.interpolate(window_logits[None], size=(window.height, window.width), mode="bilinear")[0]
        rows = slice(window.top, window.top + window.height)
        cols = slice(window.left, window.left + window.width)
        canvas[:, rows, cols] += up
        count[rows, cols] += 1
    return canvas / count.clamp_min(1)


def harness_labels(
    features: ImageFeatures, text: torch.Tensor, owner: torch.Tensor, classes: int, harness: Harness
) -> np.ndarray:
    """The harness's ``HxW`` class map at the original image size."""
    logits = F.interpolate(name_logits(features, text)[None], size=features.image_size, mode="bilinear")[0]
    per_name = torch.softmax(logits * harness.logit_scale, dim=0)
    probs = per_name.new_full((classes, *per_name.shape[1:]), 0.0)
    probs = probs.scatter_reduce_(0, owner.view(-1, 1, 1).expand_as(per_name), per_name, reduce="amax")
    if harness.area_threshold > 0:
        probs = _drop_small_classes(probs, harness)
    confidence, label = probs.max(dim=0)
    if harness.prob_threshold > 0:
        label = torch.where(confidence < harness.prob_threshold, torch.zeros_like(label), label)
    return label.cpu().numpy()


def _drop_small_classes(probs: torch.Tensor, harness: Harness) -> torch.Tensor:
    """Classes whose argmax covers at most ``area_threshold`` of the non-background argmax area get 0."""
    label = probs.argmax(dim=0)
    areas = torch.bincount(label.flatten(), minlength=probs.shape[0]).float()
    foreground = areas[1:].sum() if harness.background else areas.sum()
    small = areas <= harness.area_threshold * foreground
    if harness.background:
        small[0] = False
    return torch.where(small.view(-1, 1, 1), torch.zeros_like(probs), probs)


class HarnessPredictor:
    """``image -> HxW class indices`` with the harness's head, for ``classes`` (``a|b`` for synonyms)."""

    def __init__(self, segmenter: Segmenter, classes: Sequence[str], harness: Harness) -> None:
        self.segmenter = segmenter
        self.harness = harness
        self.labels = LabelSet.parse([name.split("|") for name in classes])
        clip = segmenter.clip
        cache = segmenter.text.cache_dir.parent if segmenter.text.cache_dir is not None else None
        embedder = TextEmbedder(clip, cache, TEMPLATE_SETS[harness.templates])
        self.text = embedder.embed(self.labels.prompts).to(clip.device)
        self.owner = torch.tensor(self.labels.owner, device=clip.device)

    @torch.inference_mode()
    def __call__(self, image: np.ndarray) -> np.ndarray:
        features = self.segmenter.encode(image)
        return harness_labels(features, self.text, self.owner, len(self.labels), self.harness)
