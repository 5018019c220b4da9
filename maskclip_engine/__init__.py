"""Zero-shot dense segmentation from a frozen CLIP model (MaskCLIP, ECCV 2022).

Pure ML: no HTTP, queue or Label Studio code lives here.
"""

from .config import ModelSpec, SegmentOptions
from .errors import (
    InvalidImageError,
    InvalidLabelsError,
    InvalidOptionError,
    MaskClipError,
    ModelNotFoundError,
    UnsupportedModelError,
    WeightsUnavailableError,
)
from .loading import LoadedClip, load_clip
from .prompts import MASKCLIP_TEMPLATES, LabelSet
from .result import SegmentationResult
from .segmenter import Segmenter

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
