"""Typed, frozen settings: which model to build and how to segment with it."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from maskclip_engine.errors import InvalidOptionError

Precision = Literal["auto", "fp32", "fp16", "bf16"]
Mode = Literal["whole", "slide"]

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "fp16", "bf16")
MODES: tuple[str, ...] = ("whole", "slide")
DENSE_MODES: tuple[str, ...] = ("maskclip", "sclip", "clearclip", "naclip", "scclip", "sfp")
KS_VARIANTS: tuple[str, ...] = ("cosine", "released")
SLIDE_REFINES: tuple[str, ...] = ("whole", "window")


def default_cache_dir() -> Path:
    """Where text embeddings are cached: ``$MASKCLIP_CACHE_DIR`` or ``~/.cache/maskclip``."""
    env = os.environ.get("MASKCLIP_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "maskclip"


@dataclass(frozen=True)
class ModelSpec:
    """Everything that decides which CLIP model is built and where it runs.

    ``model`` is an open_clip architecture name (``ViT-B-16``, ``RN50``, ...), an
    open_clip ``local-dir:``/``hf-hub:`` identifier, or the path of an open_clip
    model config JSON file. ``pretrained`` is an open_clip pretrained tag
    (``openai``, ``laion2b_s34b_b88k``, ...) or the path of a local checkpoint
    (an OpenAI TorchScript ``.pt`` or an open_clip state dict). ``device=None``
    picks CUDA when present. ``quick_gelu=None`` follows the weights: OpenAI
    weights were trained with QuickGELU, most others with GELU. ``precision``
    ``auto`` runs the image backbone in bf16 where the chip computes bf16
    natively, else fp32 (see :mod:`maskclip_engine.backbone.precision`).
    """

    model: str = "ViT-B-16"
    pretrained: str | None = "openai"
    device: str | None = None
    precision: Precision = "auto"
    quick_gelu: bool | None = None
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if not self.model or not isinstance(self.model, str):
            raise InvalidOptionError("model must be an open_clip model name such as 'ViT-B-16'.")
        if self.precision not in PRECISIONS:
            raise InvalidOptionError(
                f"precision {self.precision!r} is not supported; use one of {', '.join(PRECISIONS)}."
            )

    @property
    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir is not None else default_cache_dir()


@dataclass(frozen=True)
class SegmentOptions:
    """How one image is segmented. Every field can be overridden per call.

    Sizes are in pixels of the resized image. ``bg_threshold`` leaves pixels
    whose top class probability is below it unlabeled (0 labels every pixel).
    ``logit_scale`` is the softmax temperature used for probabilities, prompt
    denoising and key smoothing (100 in MaskCLIP).

    ``key_smoothing_variant`` ``cosine`` is the paper's per-location cosine
    smoothing; ``released`` is what MaskCLIP's released code computes (keys
    normalised per channel over locations, no renormalisation), applied where
    the top probability is below ``ks_threshold``. ``slide_refine`` ``whole``
    averages the windows' logits and keys and refines once; ``window`` refines
    inside each window and averages the windows' outputs (mmseg's slide
    inference). ``pamr`` refines the upsampled probabilities against the image's
    colours for ``pamr_iterations`` steps, on a grid of ``pamr_stride`` pixels of
    the resized image (see :mod:`maskclip_engine.head.pamr`).
    """

    mode: Mode = "whole"
    dense_mode: str = "maskclip"
    short_side: int = 448
    max_long_side: int = 2048
    crop: int = 448
    stride: int = 224
    key_smoothing: bool = True
    prompt_denoising: bool = True
    pd_threshold: float = 0.5
    bg_threshold: float = 0.0
    logit_scale: float = 100.0
    batch_size: int = 8
    key_smoothing_variant: str = "cosine"
    ks_threshold: float = 1.0
    slide_refine: str = "whole"
    pamr: bool = False
    pamr_iterations: int = 10
    pamr_stride: int = 4

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidOptionError(f"mode {self.mode!r} is not supported; use 'whole' or 'slide'.")
        if self.dense_mode not in DENSE_MODES:
            raise InvalidOptionError(
                f"dense_mode {self.dense_mode!r} is not supported; use one of {', '.join(DENSE_MODES)}."
            )
        if self.key_smoothing_variant not in KS_VARIANTS:
            raise InvalidOptionError(
                f"key_smoothing_variant {self.key_smoothing_variant!r} is not supported; use 'cosine' or 'released'."
            )
        if self.slide_refine not in SLIDE_REFINES:
            raise InvalidOptionError(f"slide_refine {self.slide_refine!r} is not supported; use 'whole' or 'window'.")
        if not isinstance(self.pamr, bool):
            raise InvalidOptionError(f"pamr must be true or false, got {self.pamr!r}.")
        for name in ("short_side", "max_long_side", "crop", "stride", "batch_size", "pamr_iterations", "pamr_stride"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidOptionError(f"{name} must be a positive integer, got {value!r}.")
        if self.max_long_side < self.short_side:
            raise InvalidOptionError(
                f"max_long_side ({self.max_long_side}) must be at least short_side ({self.short_side})."
            )
        for name in ("pd_threshold", "bg_threshold", "ks_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise InvalidOptionError(f"{name} must be a probability between 0 and 1, got {value!r}.")
        if not isinstance(self.logit_scale, (int, float)) or self.logit_scale <= 0:
            raise InvalidOptionError(f"logit_scale must be positive, got {self.logit_scale!r}.")

    def replace(self, **changes: Any) -> SegmentOptions:
        """A copy with some fields changed; unknown names raise a clear error."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise InvalidOptionError(
                f"unknown segmentation option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(known))}."
            )
        return dataclasses.replace(self, **changes) if changes else self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
