"""A Label Studio project as training data: images, and label maps from accepted annotations."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import requests
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image, ImageDraw

from maskclip_engine.training import TrainingImage

from .errors import BackendError, ImageFetchError
from .fetching import ImageFetcher
from .label_config import LabelControl, parse_label_config
from .label_studio import LabelStudioAuth

log = logging.getLogger(__name__)


class ProjectDataError(BackendError):
    """The project cannot be read from Label Studio."""


@dataclass
class ProjectData:
    control: LabelControl
    train: list[TrainingImage]  # annotated and unannotated images
    held_out: list[TrainingImage]  # annotated images kept apart to judge candidates
    skipped: int  # tasks whose image could not be fetched

    @property
    def annotated(self) -> int:
        return sum(item.labels is not None for item in self.train) + len(self.held_out)


def accepted(annotation: dict) -> bool:
    """Submitted and not cancelled; where reviews exist, not rejected."""
    if annotation.get("was_cancelled"):
        return False
    reviews = annotation.get("reviews") or []
    return not any(review.get("accepted") is False for review in reviews if isinstance(review, dict))


def label_map(annotation: dict, control: LabelControl, height: int, width: int) -> np.ndarray:
    """The annotation's regions for ``control`` as an ``HxW`` map (-1 where nothing was drawn)."""
    out = np.full((height, width), -1, dtype=np.int64)
    for region in annotation.get("result", []):
        if region.get("from_name") != control.from_name:
            continue
        value = region.get("value", {})
        names = value.get(region.get("type", ""), []) or value.get("brushlabels") or value.get("polygonlabels") or []
        if not names or names[0] not in control.labels:
            continue
        index = control.labels.index(names[0])
        mask = _region_mask(region, value, height, width)
        if mask is not None:
            out[mask] = index
    return out


def _region_mask(region: dict, value: dict, height: int, width: int) -> np.ndarray | None:
    if value.get("format") == "rle" and value.get("rle"):
        h, w = int(region.get("original_height", height)), int(region.get("original_width", width))
        alpha = np.asarray(decode_rle(value["rle"]), dtype=np.uint8)[: h * w * 4].reshape(h, w, 4)[:, :, 3]
        mask = alpha > 0
        if (h, w) != (height, width):
            mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)) > 0
        return mask
    points = value.get("points")
    if points and len(points) >= 3:
        canvas = Image.new("L", (width, height), 0)
        ImageDraw.Draw(canvas).polygon([(x * width / 100, y * height / 100) for x, y in points], fill=1)
        return np.asarray(canvas) > 0
    return None


def _held_out(task_id: int, fraction: float) -> bool:
    """A stable split: the same task is always on the same side."""
    digest = hashlib.sha256(str(task_id).encode()).digest()
    return digest[0] / 256 < fraction


def load_project(
    auth: LabelStudioAuth, fetcher: ImageFetcher, project: int, holdout_fraction: float, short_side: int
) -> ProjectData:
    """Read the project's config and tasks and fetch its images (downscaled to ``short_side``)."""
    session = requests.Session()
    try:
        info = session.get(f"{auth.url}/api/projects/{project}", headers=auth.headers(), timeout=60)
        info.raise_for_status()
        export = session.get(
            f"{auth.url}/api/projects/{project}/export",
            params={"exportType": "JSON", "download_all_tasks": "true"},
            headers=auth.headers(),
            timeout=600,
        )
        export.raise_for_status()
    except requests.RequestException as exc:
        raise ProjectDataError(f"could not read project {project} from Label Studio at {auth.url}: {exc}") from exc
    control = parse_label_config(info.json()["label_config"]).controls[0]
    tasks = export.json()

    annotated, plain, skipped = [], [], 0
    for task in tasks:
        try:
            image = fetcher.fetch(task.get("data", {}).get(control.data_key), task.get("id"))
        except ImageFetchError as exc:
            log.warning("task %s skipped for training: %s", task.get("id"), exc)
            skipped += 1
            continue
        image = _downscale(image, short_side)
        height, width = image.shape[:2]
        good = [a for a in task.get("annotations", []) if accepted(a)]
        if not good:
            plain.append(TrainingImage(image))
            continue
        best = max(good, key=lambda a: (bool(a.get("ground_truth")), a.get("updated_at") or "", a.get("id", 0)))
        labels = label_map(best, control, height, width)
        annotated.append((task.get("id", 0), TrainingImage(image, labels)))

    held = [item for task_id, item in annotated if _held_out(task_id, holdout_fraction)]
    if len(annotated) >= 2 and not held:
        held = [annotated[-1][1]]  # always judge on something once there are two annotations
    if len(held) == len(annotated) and held:
        held = held[:-1]  # and always train on at least one
    train = [item for _, item in annotated if not any(item is h for h in held)] + plain
    return ProjectData(control, train, held, skipped)


def _downscale(image: np.ndarray, short_side: int) -> np.ndarray:
    height, width = image.shape[:2]
    if min(height, width) <= short_side:
        return image
    scale = short_side / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
