"""The sentences a label is put into before CLIP's text tower reads it (MaskCLIP's prompt ensemble)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

# MaskCLIP adds five scene-level sentences to CLIP's 80 ImageNet templates.
SCENE_TEMPLATES: tuple[str, ...] = (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)

IMAGENET_TEMPLATES: tuple[str, ...] = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)
MASKCLIP_TEMPLATES: tuple[str, ...] = IMAGENET_TEMPLATES + SCENE_TEMPLATES

# Named sets: MaskCLIP's 85, and CLIP's 80 ImageNet templates alone (the later training-free methods' harness).
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"maskclip": MASKCLIP_TEMPLATES, "imagenet": IMAGENET_TEMPLATES}


def templates_digest(templates: Sequence[str]) -> str:
    """A short id of a template list, part of every text-cache key."""
    return hashlib.sha256("\n".join(templates).encode()).hexdigest()[:16]
