"""Published evaluation set-ups as data: one JSON file each, read by ``maskclip eval --protocol NAME``.

A protocol names the dataset it was published on, its classes (``a|b`` for
synonyms, in index order), how the dataset's background and ignored labels
are read, the segmentation options, the configurations scored side by side,
the published mIoU of each (in percent, with where it comes from), and, for
the later training-free methods, the settings of their own evaluation head
(``harness``, see :mod:`maskclip_engine.evaluation.harness`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskclip_engine.errors import InvalidOptionError

FOLDER = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Protocol:
    name: str
    description: str
    classes: tuple[str, ...]
    dataset: str = ""
    background: str = "none"
    bg_threshold: float = 0.0
    reduce_zero_label: bool = False
    ignore_index: int = 255
    split: str = "val"
    options: dict[str, Any] = field(default_factory=dict)
    configs: tuple[str, ...] = ()
    published: dict[str, float] = field(default_factory=dict)
    source: str = ""
    # The later methods' own head (maskclip_engine.evaluation.harness): logit_scale, prob_threshold, area_threshold.
    harness: dict[str, Any] | None = None


def protocol_names() -> list[str]:
    """The protocols that ship with the engine."""
    return sorted(path.stem for path in FOLDER.glob("*.json"))


def load_protocol(name: str) -> Protocol:
    """A shipped protocol by name, or a protocol file by path."""
    path = Path(name)
    if not path.is_file():
        path = FOLDER / f"{name}.json"
    if not path.is_file():
        raise InvalidOptionError(f"unknown protocol {name!r}; known: {', '.join(protocol_names())} (or a JSON file).")
    try:
        raw = json.loads(path.read_text())
        raw["classes"] = tuple(raw["classes"])
        raw["configs"] = tuple(raw.get("configs", ()))
        return Protocol(**raw)
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidOptionError(f"protocol file {path} is not a valid protocol: {exc}") from exc
