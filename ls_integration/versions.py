"""Model versions: the names Label Studio stores with each prediction and tells models apart by.

Label Studio skips tasks that already hold a prediction of the current
version and shows annotators the predictions of the project's selected
version, so anything that changes what a model proposes changes its version.
"""

from __future__ import annotations

import hashlib
import json

from maskclip_engine import SegmentOptions
from maskclip_engine.students.registry import parse_student_version

from .label_config import ProjectSchema


def model_version(model_id: str, weights_id: str, options: SegmentOptions) -> str:
    """A stable name for what produces the predictions, e.g. ``maskclip-ViT-B-16-openai-ks-pd``.

    Label Studio skips tasks that already hold a prediction of the current
    version, so anything that changes the masks changes the version: the
    dense mode, model, weights (tag or file hash), refinements, other
    non-default settings (a short hash), a model config file's hash, and
    QuickGELU forced onto weights that do not imply it.
    """
    name_and_config, _, flag = model_id.partition("+")
    name, _, config_hash = name_and_config.partition("@")
    kind, _, value = weights_id.partition(":")
    weights = value if kind == "tag" else f"w{value[:8]}" if value else kind
    parts = [options.dense_mode, name.replace("/", "-"), weights]
    if options.key_smoothing:
        parts.append("ks")
    if options.prompt_denoising:
        parts.append("pd")
    named = ("key_smoothing", "prompt_denoising", "batch_size", "dense_mode")
    rest = {k: v for k, v in options.to_dict().items() if k not in named}
    defaults = {k: v for k, v in SegmentOptions().to_dict().items() if k in rest}
    if rest != defaults:
        parts.append(hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()[:6])
    if config_hash:
        parts.append(config_hash[:6])
    if flag == "quickgelu" and kind != "tag":
        parts.append("qg")
    return "-".join(parts)


def maskclip_version(base: str, schema: ProjectSchema | None) -> str:
    """MaskCLIP's version for a project: ``base`` (:func:`model_version`) and the project's label set.

    Proposals for another label set are other proposals: a label added to the
    config gives a new version, which pre-annotation runs then write to every
    task, and which the project is switched to. Without a schema (no project
    known) the base version stands alone.
    """
    return base if schema is None else f"{base}-l{schema.labels_digest}"


def is_student_version(version: str | None) -> bool:
    """Students are named ``student-p<project>-v<number>`` (the engine's registry writes and parses the names);
    every other version is MaskCLIP's."""
    return parse_student_version(version) is not None
