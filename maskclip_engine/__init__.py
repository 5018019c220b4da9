"""Zero-shot dense segmentation from a frozen CLIP model (MaskCLIP, ECCV 2022).

Pure ML: no HTTP, queue or Label Studio code lives here. The folders read as
the pipeline, each importing only those before it: ``backbone`` (the frozen
CLIP model and its text tower), ``dense`` (per-location embeddings in each
dense mode), ``features`` (one image's backbone output and where it is kept),
``head`` (prompt denoising, key smoothing, PAMR), then ``segmenter`` and
``regions`` (smart-tool masks from gestures), ``students`` (MaskCLIP+),
``review`` and ``evaluation``, and ``cli``. The top-level modules (configs,
errors, labels, images, results, metrics) are shared by every step.

Names that need torch (the model, the segmenter, results) are imported on
first use, so a process that only reads settings (the gunicorn master of
``maskclip-backend serve``) never loads torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from maskclip_engine.config import ModelSpec, SegmentOptions
from maskclip_engine.errors import (
    InvalidImageError,
    InvalidLabelsError,
    InvalidOptionError,
    MaskClipError,
    ModelNotFoundError,
    UnsupportedModelError,
    WeightsUnavailableError,
)

if TYPE_CHECKING:
    from maskclip_engine.backbone.loading import LoadedClip, load_clip
    from maskclip_engine.backbone.templates import MASKCLIP_TEMPLATES
    from maskclip_engine.labels import LabelSet
    from maskclip_engine.result import SegmentationResult
    from maskclip_engine.segmenter import Segmenter

_LAZY = {
    "LoadedClip": "backbone.loading",
    "load_clip": "backbone.loading",
    "MASKCLIP_TEMPLATES": "backbone.templates",
    "LabelSet": "labels",
    "SegmentationResult": "result",
    "Segmenter": "segmenter",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


__all__ = [
    "InvalidImageError",
    "InvalidLabelsError",
    "InvalidOptionError",
    "LabelSet",
    "LoadedClip",
    "MASKCLIP_TEMPLATES",
    "MaskClipError",
    "ModelNotFoundError",
    "ModelSpec",
    "SegmentOptions",
    "SegmentationResult",
    "Segmenter",
    "UnsupportedModelError",
    "WeightsUnavailableError",
    "load_clip",
]
