"""Measured quality: mIoU of one or more configurations on a labelled dataset.

Datasets come in PASCAL VOC layout (``JPEGImages/``, indexed-PNG
``SegmentationClass/``, optional ``ImageSets/Segmentation/<split>.txt``) or as
samples built in code (a Label Studio project's accepted annotations). Every
score comes from :mod:`maskclip_engine.miou`, the code the training gate uses.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from maskclip_engine.config import KS_VARIANTS, SegmentOptions
from maskclip_engine.errors import InvalidOptionError
from maskclip_engine.evaluation.harness import Harness, HarnessPredictor
from maskclip_engine.images import decode_image
from maskclip_engine.labels import LabelSet
from maskclip_engine.miou import Scores, confusion_matrix, scores
from maskclip_engine.segmenter import Segmenter

# PASCAL VOC's 21 classes, with the spellings CLIP reads better as synonyms.
VOC_CLASSES = (
    "background",
    "aeroplane|airplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable|dining table|table",
    "dog",
    "horse",
    "motorbike|motorcycle",
    "person",
    "pottedplant|potted plant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor|tv monitor|monitor",
)
BACKGROUNDS = ("threshold", "class", "none")


@dataclass
class Sample:
    name: str
    image: np.ndarray  # HxWx3 uint8
    truth: np.ndarray  # HxW int, class index or the ignore index


@dataclass(frozen=True)
class EvalConfig:
    """One configuration to score: segmentation options, or a student checkpoint."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    student: str | None = None

    @classmethod
    def parse(cls, text: str) -> EvalConfig:
        """``"name=sclip+ks,dense_mode=sclip,key_smoothing=true"`` or ``"student=/models/v3.pt"``.

        Bare words are shorthands: a dense mode (``sclip``), a key-smoothing
        variant (``cosine``, ``released``), ``window`` (per-window slide
        refinement), ``pamr`` and ``no-pamr``; ``ks_variant`` stands for
        ``key_smoothing_variant``. ``"released,window,pamr"`` thus scores the
        released key smoothing, refined per window, with PAMR.
        """
        options: dict[str, Any] = {}
        name = student = None
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep:
                options.update(_shorthand(key))
                continue
            if key == "name":
                name = value
            elif key == "student":
                student = value
            else:
                options[_ALIASES.get(key, key)] = _value(value)
        label = name or (f"student:{Path(student).stem}" if student else _describe(options))
        return cls(label, options, student)


_ALIASES = {"ks_variant": "key_smoothing_variant"}


def _shorthand(word: str) -> dict[str, Any]:
    if word in KS_VARIANTS:
        return {"key_smoothing_variant": word}
    if word == "window":
        return {"slide_refine": "window"}
    if word in ("pamr", "no-pamr"):
        return {"pamr": word == "pamr"}
    # Anything else is read as a dense mode; SegmentOptions names the valid ones if it is not.
    return {"dense_mode": word}


def _value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "on", "yes"):
        return True
    if lowered in ("false", "off", "no"):
        return False
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _describe(options: dict[str, Any]) -> str:
    if not options:
        return "default"
    return ",".join(f"{k}={v}" for k, v in options.items())


def read_classes(path: Path | None, root: Path | None = None) -> list[str]:
    """Class names, one per line (``a|b`` for synonyms); VOC's 21 when no file is given or found."""
    candidates = [path] if path else [root / "classes.txt", root / "class_names.txt"] if root else []
    for candidate in candidates:
        if candidate is not None and candidate.is_file():
            names = [line.strip() for line in candidate.read_text().splitlines() if line.strip()]
            if names:
                return names
        elif path is not None:
            raise InvalidOptionError(f"class list {path} does not exist.")
    return list(VOC_CLASSES)


def read_voc(root: Path, split: str | None = "val", limit: int | None = None) -> list[tuple[str, Path, Path]]:
    """``(id, image path, label path)`` of a VOC-layout dataset."""
    images, labels = root / "JPEGImages", root / "SegmentationClass"
    if not images.is_dir() or not labels.is_dir():
        raise InvalidOptionError(f"{root} is not in VOC layout: it needs JPEGImages/ and SegmentationClass/ folders.")
    listing = root / "ImageSets" / "Segmentation" / f"{split}.txt" if split else None
    if listing is not None and listing.is_file():
        ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    else:
        ids = sorted(p.stem for p in labels.glob("*.png"))
    found = []
    for sample_id in ids[:limit] if limit else ids:
        image = next(
            (
                images / f"{sample_id}{ext}"
                for ext in (".jpg", ".jpeg", ".png")
                if (images / f"{sample_id}{ext}").is_file()
            ),
            None,
        )
        if image is None:
            raise InvalidOptionError(f"{sample_id} has a label map but no image in {images}.")
        found.append((sample_id, image, labels / f"{sample_id}.png"))
    if not found:
        raise InvalidOptionError(f"no samples found in {root} (split {split!r}).")
    return found


def load_sample(sample_id: str, image: Path, label: Path, ignore_index: int, reduce_zero_label: bool = False) -> Sample:
    """An image and its truth; ``reduce_zero_label`` ignores class 0 and shifts the rest down (VOC-20, Context-59)."""
    rgb = decode_image(image)
    with Image.open(label) as handle:
        truth = np.array(handle).astype(np.int64)  # palette indices for VOC's P-mode PNGs
    if truth.shape != rgb.shape[:2]:
        raise InvalidOptionError(f"{label} is {truth.shape[::-1]} but its image is {rgb.shape[1::-1]}.")
    ignored = truth == ignore_index
    if reduce_zero_label:
        ignored |= truth == 0
        truth = truth - 1
    truth[ignored] = -1
    return Sample(sample_id, rgb, truth)


@dataclass
class EvalSpec:
    """Everything one evaluation run needs besides the data: a protocol's settings with any overrides."""

    classes: list[str] | None  # None: read them from the data set's folder
    split: str
    background: str
    bg_threshold: float
    ignore_index: int
    reduce_zero_label: bool
    options: SegmentOptions
    configs: list[EvalConfig]
    published: dict[str, float] = field(default_factory=dict)
    protocol: Any = None
    harness: Harness | None = None  # the later methods' own head instead of MaskCLIP's


Predictor = Callable[[np.ndarray], np.ndarray]


def config_predictor(
    segmenter: Segmenter,
    config: EvalConfig,
    classes: Sequence[str],
    background: str,
    bg_threshold: float,
    harness: Harness | None = None,
) -> Predictor:
    """``image -> HxW class indices`` for one configuration, under the dataset's background convention.

    With ``harness``, MaskCLIP's head gives way to the later methods' evaluation head, which prompts every
    class (the background one too, at index 0).
    """
    if background not in BACKGROUNDS:
        raise InvalidOptionError(f"background {background!r}: use one of {', '.join(BACKGROUNDS)}.")
    if harness is not None:
        if background == "threshold" or config.student:
            raise InvalidOptionError("the harness prompts every class (background too) and scores no students.")
        return HarnessPredictor(segmenter.with_options(segmenter.options.replace(**config.options)), classes, harness)
    offset = 1 if background == "threshold" else 0
    prompted = LabelSet.parse([name.split("|") for name in classes[offset:]])
    threshold = bg_threshold if background == "threshold" else 0.0
    if config.student:
        from maskclip_engine.students.checkpoint import StudentCheckpoint
        from maskclip_engine.students.serving import StudentSegmenter

        checkpoint = StudentCheckpoint.load(Path(config.student), segmenter.clip.device)
        asked = config.options.get("dense_mode", checkpoint.dense_mode)
        if asked != checkpoint.dense_mode:
            raise InvalidOptionError(
                f"student {config.student} was trained on {checkpoint.dense_mode!r} features and is served with "
                f"them; drop dense_mode={asked} from its configuration."
            )
        # Other options (image sizes) apply as they do to MaskCLIP; the student reads its own dense mode.
        view = segmenter.with_options(segmenter.options.replace(**config.options))
        student = StudentSegmenter(view, checkpoint)
        if student.labels != prompted.names:
            raise InvalidOptionError(
                f"student {config.student} predicts {student.labels}, not this dataset's {prompted.names}."
            )

        def predict_student(image: np.ndarray) -> np.ndarray:
            label_map = student.segment(image, bg_threshold=threshold).label_map
            return np.where(label_map >= 0, label_map + offset, 0 if offset else -1)

        return predict_student
    options = segmenter.options.replace(**{**config.options, "bg_threshold": threshold})

    def predict(image: np.ndarray) -> np.ndarray:
        label_map = segmenter.segment(image, prompted, **options.to_dict()).label_map
        return np.where(label_map >= 0, label_map + offset, 0 if offset else -1)

    return predict


def evaluate_configs(
    predictors: dict[str, Predictor],
    samples: Iterable[Sample],
    num_classes: int,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> dict[str, Scores]:
    """Scores per configuration; each image is read once and seen by every configuration."""
    totals = {name: np.zeros((num_classes, num_classes + 1), dtype=np.int64) for name in predictors}
    for sample in progress(samples):
        for name, predict in predictors.items():
            totals[name] += confusion_matrix(predict(sample.image), sample.truth, num_classes)
    return {name: scores(matrix) for name, matrix in totals.items()}


def report_table(results: dict[str, Scores], classes: Sequence[str], published: dict[str, float] | None = None) -> str:
    """A terminal table: one row per configuration, its published mIoU beside it, per-class IoU when there are
    few classes."""
    short = [name.split("|")[0] for name in classes]
    per_class = len(classes) <= 25
    published = published or {}
    headers = ["config", "mIoU", "published", "pixel acc"] + (short if per_class else [])
    rows = []
    for name, result in results.items():
        paper = f"{published[name]:.1f}" if name in published else "-"
        row = [name, f"{100 * result.miou:.1f}", paper, f"{100 * result.pixel_accuracy:.1f}"]
        if per_class:
            row += ["-" if np.isnan(v) else f"{100 * v:.1f}" for v in result.iou]
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(headers, widths)), "-|-".join("-" * w for w in widths)]
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def report_json(results: dict[str, Scores], classes: Sequence[str], **context: Any) -> str:
    names = [name.split("|")[0] for name in classes]
    return json.dumps(
        {**context, "classes": names, "results": {name: result.to_dict(names) for name, result in results.items()}},
        indent=2,
    )
