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

from .errors import BackendError, ImageFetchError, ImageHostUnreachableError
from .fetching import ImageFetcher
from .label_config import LabelControl, parse_label_config
from .label_studio import LabelStudioAuth
from .retrying import retrying_session

log = logging.getLogger(__name__)


class ProjectDataError(BackendError):
    """The project cannot be read from Label Studio."""


@dataclass
class ProjectData:
    control: LabelControl
    train: list[TrainingImage]  # annotated and unannotated images
    held_out: list[TrainingImage]  # annotated images kept apart to judge candidates
    skipped: int  # tasks whose image could not be fetched
    skipped_annotations: int = 0  # annotations that could not be read (their images train unannotated)

    @property
    def annotated(self) -> int:
        return sum(item.labels is not None for item in self.train) + len(self.held_out)


def accepted(annotation: dict) -> bool:
    """Submitted and not cancelled; where reviews exist, not rejected."""
    if annotation.get("was_cancelled"):
        return False
    reviews = annotation.get("reviews") or []
    return not any(review.get("accepted") is False for review in reviews if isinstance(review, dict))


class AnnotationError(ValueError):
    """An annotation whose regions cannot be read; it is skipped, its image still trains."""


MAX_POLYGON_POINTS = 100_000
UNREACHABLE_LIMIT = 5  # this many tasks in a row whose image host does not answer end the read


def label_map(
    annotation: dict, control: LabelControl, height: int, width: int, max_pixels: int = 50_000_000
) -> np.ndarray:
    """The annotation's regions for ``control`` as an ``HxW`` map (-1 where nothing was drawn).

    Raises :class:`AnnotationError` for a region that cannot be read (a
    malformed or oversized RLE, bad polygon points); ``max_pixels`` caps the
    size an RLE may claim before anything is allocated for it.
    """
    out = np.full((height, width), -1, dtype=np.int64)
    results = annotation.get("result", [])
    if not isinstance(results, list):
        raise AnnotationError("its 'result' is not a list")
    for region in results:
        if not isinstance(region, dict) or region.get("from_name") != control.from_name:
            continue
        value = region.get("value", {})
        if not isinstance(value, dict):
            raise AnnotationError("a region's 'value' is not an object")
        names = value.get(region.get("type", ""), []) or value.get("brushlabels") or value.get("polygonlabels") or []
        if not names or names[0] not in control.labels:
            continue
        index = control.labels.index(names[0])
        try:
            mask = _region_mask(region, value, height, width, max_pixels)
        except AnnotationError:
            raise
        except (ValueError, TypeError, IndexError, OverflowError) as exc:  # a truncated RLE, for one
            raise AnnotationError(f"a {region.get('type', 'region')} region cannot be read: {exc}") from None
        if mask is not None:
            out[mask] = index
    return out


def _region_mask(region: dict, value: dict, height: int, width: int, max_pixels: int) -> np.ndarray | None:
    if value.get("format") == "rle" and value.get("rle"):
        rle = value["rle"]
        h, w = int(region.get("original_height", height)), int(region.get("original_width", width))
        if h <= 0 or w <= 0 or h * w > max_pixels:
            raise AnnotationError(
                f"a brush region claims {w}x{h} pixels (limit {max_pixels:,}, MASKCLIP_MAX_IMAGE_PIXELS)"
            )
        if not isinstance(rle, list) or len(rle) < 5 or not all(isinstance(b, int) and 0 <= b < 256 for b in rle):
            raise AnnotationError("a brush region's 'rle' is not a list of bytes")
        claimed = int.from_bytes(bytes(rle[:4]), "big")  # the RLE header: how many values decode_rle allocates
        if claimed != h * w * 4:
            raise AnnotationError(f"a brush region's RLE holds {claimed:,} values, not {w}x{h}x4 = {h * w * 4:,}")
        alpha = np.asarray(decode_rle(rle), dtype=np.uint8).reshape(h, w, 4)[:, :, 3]
        mask = alpha > 0
        if (h, w) != (height, width):
            mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)) > 0
        return mask
    points = value.get("points")
    if points and len(points) >= 3:
        if not isinstance(points, list) or len(points) > MAX_POLYGON_POINTS:
            raise AnnotationError(f"a polygon has over {MAX_POLYGON_POINTS:,} points or no list of them")
        scaled = []
        for point in points:
            x, y = (float(v) for v in point)
            if not (np.isfinite(x) and np.isfinite(y) and -1 <= x <= 101 and -1 <= y <= 101):
                raise AnnotationError(f"a polygon point {point!r} is not within the image (0-100 %)")
            scaled.append((x * width / 100, y * height / 100))
        canvas = Image.new("L", (width, height), 0)
        ImageDraw.Draw(canvas).polygon(scaled, fill=1)
        return np.asarray(canvas) > 0
    return None


def _held_out(task_id: int, fraction: float) -> bool:
    """A stable split: the same task is always on the same side."""
    digest = hashlib.sha256(str(task_id).encode()).digest()
    return digest[0] / 256 < fraction


def load_project(
    auth: LabelStudioAuth, fetcher: ImageFetcher, project: int, holdout_fraction: float, short_side: int
) -> ProjectData:
    """Read the project's config and tasks and fetch its images (downscaled to ``short_side``).

    Never all or nothing: a task whose image cannot be fetched is skipped, an
    annotation that cannot be read is dropped (its image trains unannotated);
    both are logged and counted.
    """
    session = retrying_session(fetcher.settings.fetch_retries)
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

    if not isinstance(tasks, list):
        raise ProjectDataError(f"Label Studio's export of project {project} is not a list of tasks.")
    max_pixels = fetcher.settings.max_image_pixels
    annotated, plain, skipped, bad_annotations, unreachable = [], [], 0, 0, 0
    for task in tasks:
        task_id = task.get("id") if isinstance(task, dict) else None
        try:
            if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
                raise ImageFetchError("the task has no 'data' object")
            image = fetcher.fetch(task["data"].get(control.data_key), task_id)
        except ImageHostUnreachableError as exc:
            unreachable += 1
            skipped += 1
            log.warning("task %s skipped for training: %s", task_id, exc)
            if unreachable >= UNREACHABLE_LIMIT:  # the server is gone: a partial data set would mislead the gate
                raise ProjectDataError(
                    f"the image host stopped answering while project {project}'s data was read ({unreachable} "
                    f"tasks in a row, after {len(annotated) + len(plain)} images); nothing was trained or stored. "
                    "Start training again once Label Studio is back."
                ) from exc
            continue
        except ImageFetchError as exc:
            log.warning("task %s skipped for training: %s", task_id, exc)
            skipped += 1
            continue
        unreachable = 0
        image = _downscale(image, short_side)
        height, width = image.shape[:2]
        annotations = task.get("annotations")
        good = [a for a in annotations if isinstance(a, dict) and accepted(a)] if isinstance(annotations, list) else []
        if not good:
            plain.append(TrainingImage(image))
            continue
        best = max(good, key=lambda a: (bool(a.get("ground_truth")), str(a.get("updated_at") or ""), _int(a.get("id"))))
        try:
            labels = label_map(best, control, height, width, max_pixels)
        except AnnotationError as exc:
            log.warning("task %s: annotation %s skipped for training: %s", task_id, best.get("id"), exc)
            bad_annotations += 1
            plain.append(TrainingImage(image))
            continue
        annotated.append((_int(task_id), TrainingImage(image, labels)))

    held = [item for task_id, item in annotated if _held_out(task_id, holdout_fraction)]
    if len(annotated) >= 2 and not held:
        held = [annotated[-1][1]]  # always judge on something once there are two annotations
    if len(held) == len(annotated) and held:
        held = held[:-1]  # and always train on at least one
    train = [item for _, item in annotated if not any(item is h for h in held)] + plain
    return ProjectData(control, train, held, skipped, bad_annotations)


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _downscale(image: np.ndarray, short_side: int) -> np.ndarray:
    height, width = image.shape[:2]
    if min(height, width) <= short_side:
        return image
    scale = short_side / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
