"""Label Studio's smart tools (interactive pre-annotation): the regions an annotator just drew become one mask.

With *Interactive preannotations* on, Label Studio calls ``/predict`` for one
task with ``params.context.result``: the smart keypoints, smart rectangles
and text prompts just drawn, in the usual result format (coordinates in
percent of the image). The answer is one prediction whose result is a brush
(or polygon) region for the project's output control on that image.

Every gesture on an image is answered from that image's dense state (features,
keys, label probabilities), kept for recent images in a :class:`FeatureCache`;
the ordinary ``/predict`` fills it when a task is opened. A task that was
pre-annotated by the workers never gets that ``/predict``, so its first
gesture builds the state from the feature store, where pre-annotation left the
image's backbone output: no backbone pass either way. The region logic is
:mod:`maskclip_engine.regions`.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from maskclip_engine import LabelSet, SegmentationResult, Segmenter
from maskclip_engine.features.cache import FeatureCache
from maskclip_engine.features.dense_state import DenseState
from maskclip_engine.features.image_features import FeatureKey
from maskclip_engine.regions import Gestures, Region, gesture_region
from maskclip_engine.students.serving import StudentSegmenter

from .errors import BadRequestError
from .label_config import LabelControl, ProjectSchema
from .regions import brush_region, polygon_regions

log = logging.getLogger(__name__)

GESTURE_TYPES = ("keypointlabels", "rectanglelabels", "textarea")


@dataclass
class ToolGestures:
    """The gestures of one interaction on one image, in percent of the image (as Label Studio sends them)."""

    to_name: str
    positive: list[tuple[float, float]] = field(default_factory=list)
    negative: list[tuple[float, float]] = field(default_factory=list)
    box: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1
    text: str | None = None
    labels: list[str] = field(default_factory=list)  # labels the regions carry, positive ones first

    def in_pixels(self, width: int, height: int) -> Gestures:
        def scale(point: tuple[float, float]) -> tuple[float, float]:
            return (point[0] * width / 100, point[1] * height / 100)

        box = None
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            box = (x0 * width / 100, y0 * height / 100, x1 * width / 100, y1 * height / 100)
        return Gestures(
            positive=tuple(scale(p) for p in self.positive),
            negative=tuple(scale(p) for p in self.negative),
            box=box,
        )


def context_regions(context: Any) -> list[dict] | None:
    """``params.context.result`` as a list, or ``None`` when the request is not interactive."""
    if not isinstance(context, dict) or "result" not in context:
        return None
    regions = context["result"]
    if regions is None:
        return []
    if not isinstance(regions, list):
        raise BadRequestError("params.context.result must be a list of Label Studio regions.")
    return regions


def parse_gestures(regions: Sequence[Any], schema: ProjectSchema) -> ToolGestures | None:
    """The prompts on the first image that has an output control; ``None`` when there are none."""
    gestures: ToolGestures | None = None
    smart = {control.from_name for control in schema.smart}
    for region in regions:
        if not isinstance(region, dict) or region.get("type") not in GESTURE_TYPES:
            continue
        if region.get("from_name") not in smart:
            continue  # a plain (not smart) keypoint or box is an annotation, not a prompt
        to_name = region.get("to_name")
        value = region.get("value")
        if not isinstance(value, dict) or not isinstance(to_name, str) or schema.output_for(to_name) is None:
            continue
        if gestures is None:
            gestures = ToolGestures(to_name)
        elif to_name != gestures.to_name:
            continue  # one mask per interaction: prompts on another image are not for this one
        kind = region["type"]
        positive = region.get("is_positive", True) is not False
        if kind == "keypointlabels":
            point = (_number(value, "x"), _number(value, "y"))
            (gestures.positive if positive else gestures.negative).append(point)
        elif kind == "rectanglelabels":
            x, y = _number(value, "x"), _number(value, "y")
            x2, y2 = x + _number(value, "width"), y + _number(value, "height")
            gestures.box = (min(x, x2), min(y, y2), max(x, x2), max(y, y2))
        else:
            texts = value.get("text")
            text = texts[0] if isinstance(texts, list) and texts else texts
            if isinstance(text, str) and text.strip():
                gestures.text = text.strip()
        for key, labels in value.items():
            if key.endswith("labels") and isinstance(labels, list) and (positive or kind != "keypointlabels"):
                gestures.labels += [str(label) for label in labels]
    if gestures is None or (not gestures.positive and gestures.box is None and gestures.text is None):
        return None
    return gestures


def _number(value: dict, key: str) -> float:
    raw = value.get(key)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise BadRequestError(f"an interactive region's value.{key} must be a number (percent of the image).")
    return float(raw)


def label_index(name: str, control: LabelControl) -> int | None:
    """A label name (or one of its ``predicted_values``) to the output control's label, case-insensitively."""
    wanted = name.strip().lower()
    for index, prompts in enumerate(control.prompts):
        if wanted in (p.lower() for p in (control.labels[index], *prompts)):
            return index
    return None


def label_named_in(phrase: str, control: LabelControl) -> int | None:
    """The label a phrase names as a word ("red car on the left" names ``car``); the longest name wins."""
    best: tuple[int, int] | None = None
    text = phrase.lower()
    for index, prompts in enumerate(control.prompts):
        for name in (control.labels[index], *prompts):
            if re.search(rf"(?<!\w){re.escape(name.lower())}(?:e?s)?(?!\w)", text):
                if best is None or len(name) > best[0]:
                    best = (len(name), index)
    return best[1] if best else None


class InteractiveAnnotator:
    """Dense states of recent images (filled by ordinary predictions) and the answers to interactions.

    ``lock`` serialises model calls with the rest of the process (see
    :mod:`maskclip_service.device_lock`); region logic runs outside it.
    """

    def __init__(self, segmenter: Segmenter, cache_mb: float, lock: threading.Lock | None = None) -> None:
        self.segmenter = segmenter
        self.cache = FeatureCache(cache_mb)  # dense states by image, model version and label set
        self.lock = lock or threading.Lock()
        self._label_embeddings: dict[tuple[tuple[str, ...], ...], torch.Tensor] = {}
        self._embeddings_lock = threading.Lock()

    def label_embeddings(self, control: LabelControl) -> torch.Tensor:
        """``[C, D]`` embeddings of the control's labels, kept per label set (phrases are scored against them)."""
        with self._embeddings_lock:
            found = self._label_embeddings.get(control.prompts)
        if found is None:
            found = self.segmenter.text_embeddings([list(p) for p in control.prompts])
            with self._embeddings_lock:
                if len(self._label_embeddings) >= 64:  # projects come and go; a few label sets are live
                    self._label_embeddings.clear()
                self._label_embeddings[control.prompts] = found
        return found

    def key(self, rgb: np.ndarray, version: str, control: LabelControl) -> tuple[FeatureKey, str, tuple]:
        """What a dense state depends on: the image's features, the model that scores them, the labels."""
        options = self.segmenter.options
        return (
            self.segmenter.feature_key(rgb, options),
            version,
            (control.prompts, tuple(sorted(options.to_dict().items()))),
        )

    def segment(
        self,
        images: Sequence[np.ndarray],
        control: LabelControl,
        version: str,
        student: StudentSegmenter | None,
        bg_threshold: float,
    ) -> list[SegmentationResult]:
        """Segment like ``/predict`` always did, keeping each image's dense state for the clicks to come.

        Call it under the device lock.
        """
        results = []
        for rgb in images:
            result, state = self._compute(rgb, control, student, bg_threshold)
            self.cache.put(self.key(rgb, version, control), state)
            results.append(result)
        return results

    def _compute(
        self, rgb: np.ndarray, control: LabelControl, student: StudentSegmenter | None, bg_threshold: float
    ) -> tuple[SegmentationResult, DenseState]:
        if student is not None:
            return student.segment_with_state(rgb, bg_threshold=bg_threshold)
        return self.segmenter.segment_with_state(rgb, LabelSet.parse([list(p) for p in control.prompts]))

    def state(
        self, rgb: np.ndarray, control: LabelControl, version: str, student: StudentSegmenter | None
    ) -> tuple[DenseState, bool]:
        """The image's dense state and whether it came from the cache (else built now: from the feature store
        when the image was pre-annotated, else with one forward pass)."""
        key = self.key(rgb, version, control)
        cached = self.cache.get(key)
        if cached is not None:
            return cached, True
        with self.lock:
            _, state = self._compute(rgb, control, student, 0.0)
        self.cache.put(key, state)
        return state, False

    def answer(
        self,
        gestures: ToolGestures,
        control: LabelControl,
        fetch: Callable[[str], np.ndarray],
        version: str,
        student: StudentSegmenter | None,
    ) -> dict:
        """One prediction for the interaction: a region labelled for ``control``, or no region."""
        rgb = fetch(control.data_key)
        height, width = rgb.shape[:2]
        state, _ = self.state(rgb, control, version, student)
        pixels = gestures.in_pixels(width, height)
        label, how = self._label(gestures, control)
        text = competitors = None
        if gestures.text is not None:
            text = self.segmenter.text.embed([gestures.text])[0]  # 85 templates, cached on disk and in memory
            keep = [i for i in range(len(control.labels)) if i != label]
            competitors = self.label_embeddings(control)[keep] if keep else None
        asked = Gestures(pixels.positive, pixels.negative, pixels.box, text, competitors, label)
        found = gesture_region(state, asked)
        if not found.mask.any():
            return {"result": [], "score": 0.0, "model_version": version}
        if label is None:
            label, how = _likeliest_label(state, found), "chosen by MaskCLIP: the likeliest label inside the mask"
        name = control.labels[label]
        if control.result_type == "brushlabels":
            regions = [brush_region(control, name, found.mask, found.score)]
        else:
            regions = polygon_regions(control, name, found.mask, found.score)
        for region in regions:
            region["meta"] = {"text": [f"label {name!r}: {how}"]}
        return {"result": regions, "score": round(found.score, 4), "model_version": version}

    @staticmethod
    def _label(gestures: ToolGestures, control: LabelControl) -> tuple[int | None, str]:
        """Which output label the mask gets, and a sentence on how it was chosen."""
        if gestures.text is not None:
            named = label_named_in(gestures.text, control)
            if named is not None:
                return named, f"named in the prompt {gestures.text!r}"
        for carried in gestures.labels:
            index = label_index(carried, control)
            if index is not None:
                return index, "selected with the prompt" if gestures.text is not None else "carried by the prompt"
        return None, ""


def _likeliest_label(state: DenseState, found: Region) -> int:
    """The label with the highest mean probability over the mask's grid cells."""
    height, width = state.image_size
    rows, cols = state.grid
    ys = np.minimum(((np.arange(rows) + 0.5) * height / rows).astype(int), height - 1)
    xs = np.minimum(((np.arange(cols) + 0.5) * width / cols).astype(int), width - 1)
    cells = torch.from_numpy(found.mask[np.ix_(ys, xs)])
    if not bool(cells.any()):
        row, col = np.argwhere(found.mask)[0]
        cells[min(int(row * rows / height), rows - 1), min(int(col * cols / width), cols - 1)] = True
    return int(state.probs[:, cells].mean(dim=1).argmax())
