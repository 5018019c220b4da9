"""A Label Studio project as training data: images, and label maps from accepted annotations."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import requests
from PIL import Image, ImageDraw

from maskclip_engine.features.image_features import ImageFeatures
from maskclip_engine.students.training import TrainingImage
from maskclip_service.settings import Settings

from .auth import LabelStudioAuth
from .connection import require_label_studio
from .errors import AnnotationError, ImageFetchError, ImageHostUnreachableError, ProjectDataError
from .fetching import ImageFetcher
from .label_config import LabelControl, parse_label_config
from .retrying import retrying_session
from .rle import decode_mask

log = logging.getLogger(__name__)


@dataclass
class AnnotatedTask:
    """An accepted annotation as training data: its task, its id, and the image with its label map."""

    task: int
    annotation: int
    item: TrainingImage


@dataclass
class ProjectData:
    control: LabelControl
    train: list[TrainingImage]  # annotated and unannotated images
    held_out: list[TrainingImage]  # annotated images kept apart to judge candidates
    skipped: int  # tasks whose image could not be fetched
    skipped_annotations: int = 0  # annotations that could not be read (their images train unannotated)
    annotated_tasks: list[AnnotatedTask] = field(default_factory=list)  # every annotated task, held out or not

    @property
    def annotated(self) -> int:
        return sum(item.labels is not None for item in self.train) + len(self.held_out)


def accepted(annotation: dict) -> bool:
    """Submitted and not cancelled; where reviews exist, not rejected."""
    if annotation.get("was_cancelled"):
        return False
    reviews = annotation.get("reviews") or []
    return not any(review.get("accepted") is False for review in reviews if isinstance(review, dict))


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
        h, w = int(region.get("original_height", height)), int(region.get("original_width", width))
        mask = decode_mask(value["rle"], h, w, max_pixels)
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


Encode = Callable[[np.ndarray], ImageFeatures]


def read_project(
    settings: Settings,
    project: int,
    short_side: int,
    *,
    auth: LabelStudioAuth | None = None,
    encode: Encode | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ProjectData:
    """:func:`load_project` as every job reads a project: its Label Studio found by the one rule
    (:func:`.connection.require_label_studio`, unless ``auth`` is given), images fetched within the settings'
    limits, and the settings' held-out share."""
    auth = auth or require_label_studio(settings, project)
    return load_project(
        auth,
        ImageFetcher(settings, auth),
        project,
        settings.holdout_fraction,
        short_side=short_side,
        encode=encode,
        progress=progress,
    )


def load_project(
    auth: LabelStudioAuth,
    fetcher: ImageFetcher,
    project: int,
    holdout_fraction: float,
    short_side: int,
    encode: Encode | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ProjectData:
    """Read the project's config and tasks and fetch its images (downscaled to ``short_side``).

    ``encode`` turns each full-size image into its CLIP features before it is
    downscaled (the feature store holds them under the image as Label Studio
    serves it); they travel with the image. Never all or nothing: a task whose
    image cannot be fetched is skipped, an annotation that cannot be read is
    dropped (its image trains unannotated); both are logged and counted.
    ``progress(done, total)`` hears about every task.
    """
    control, tasks = _read_export(auth, fetcher, project)
    reader = _TaskReader(fetcher, control, project, short_side, encode)
    for done, task in enumerate(tasks, 1):
        reader.read(task)
        if progress is not None:
            progress(done, len(tasks))
    annotated = reader.annotated
    held = [a.item for a in annotated if _held_out(a.task, holdout_fraction)]
    if len(annotated) >= 2 and not held:
        held = [annotated[-1].item]  # always judge on something once there are two annotations
    if len(held) == len(annotated) and held:
        held = held[:-1]  # and always train on at least one
    train = [a.item for a in annotated if not any(a.item is h for h in held)] + reader.plain
    return ProjectData(control, train, held, reader.skipped, reader.bad_annotations, annotated)


def _read_export(auth: LabelStudioAuth, fetcher: ImageFetcher, project: int) -> tuple[LabelControl, list]:
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
    return control, tasks


class _TaskReader:
    """Turns exported tasks into training images one at a time, counting what it had to skip."""

    def __init__(
        self, fetcher: ImageFetcher, control: LabelControl, project: int, short_side: int, encode: Encode | None
    ) -> None:
        self.fetcher, self.control, self.project = fetcher, control, project
        self.short_side, self.encode = short_side, encode
        self.annotated: list[AnnotatedTask] = []
        self.plain: list[TrainingImage] = []
        self.skipped = self.bad_annotations = self.unreachable = 0

    def read(self, task: object) -> None:
        task_id = task.get("id") if isinstance(task, dict) else None
        image = self._fetch(task, task_id)
        if image is None:
            return
        features = self.encode(image) if self.encode is not None else None
        image = _downscale(image, self.short_side)
        annotations = task.get("annotations")  # type: ignore[union-attr]
        good = [a for a in annotations if isinstance(a, dict) and accepted(a)] if isinstance(annotations, list) else []
        if not good:
            self.plain.append(TrainingImage(image, features=features))
            return
        best = max(good, key=lambda a: (bool(a.get("ground_truth")), str(a.get("updated_at") or ""), _int(a.get("id"))))
        try:
            labels = label_map(best, self.control, *image.shape[:2], self.fetcher.settings.max_image_pixels)
        except AnnotationError as exc:
            log.warning("task %s: annotation %s skipped for training: %s", task_id, best.get("id"), exc)
            self.bad_annotations += 1
            self.plain.append(TrainingImage(image, features=features))
            return
        item = TrainingImage(image, labels, features=features)
        self.annotated.append(AnnotatedTask(_int(task_id), _int(best.get("id")), item))

    def _fetch(self, task: object, task_id: object) -> np.ndarray | None:
        try:
            if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
                raise ImageFetchError("the task has no 'data' object")
            image = self.fetcher.fetch(task["data"].get(self.control.data_key), task_id)
        except ImageHostUnreachableError as exc:
            self.unreachable += 1
            self.skipped += 1
            log.warning("task %s skipped for training: %s", task_id, exc)
            if self.unreachable >= UNREACHABLE_LIMIT:  # the server is gone: a partial data set would mislead
                raise ProjectDataError(
                    f"the image host stopped answering while project {self.project}'s data was read "
                    f"({self.unreachable} tasks in a row, after {len(self.annotated) + len(self.plain)} images); "
                    "nothing was trained or stored. Start training again once Label Studio is back."
                ) from exc
            return None
        except ImageFetchError as exc:
            log.warning("task %s skipped for training: %s", task_id, exc)
            self.skipped += 1
            return None
        self.unreachable = 0
        return image


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


def _downscale(image: np.ndarray, short_side: int) -> np.ndarray:
    height, width = image.shape[:2]
    if min(height, width) <= short_side:
        return image
    scale = short_side / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
