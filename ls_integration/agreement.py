"""Agreement of submitted annotations with the proposals their tasks held, kept per project.

A record per annotation id lives in ``MODEL_DIR/project-N/agreement.jsonl``:
one JSON line per comparison, appended under a file lock, the latest line of
an annotation id winning (an ANNOTATION_UPDATED replaces the earlier record
without rewriting the file). The numbers are those of
:mod:`maskclip_engine.evaluation.annotation_agreement`; Label Studio's brush
(RLE) and polygon regions become label maps through :func:`.training_data.label_map`.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

from maskclip_engine.evaluation.annotation_agreement import compare_label_maps

from .auth import LabelStudioAuth
from .errors import AnnotationError, ProjectDataError
from .label_config import LabelControl, parse_label_config
from .retrying import retrying_session
from .training_data import accepted, label_map

AGREEMENT_FILE = "agreement.jsonl"
# Regions without original_width/height (hand-written polygons) are in percent: this grid resolves them finely.
PERCENT_GRID = 1000


def agreement_path(model_dir: Path, project: int | str) -> Path:
    return Path(model_dir) / f"project-{project}" / AGREEMENT_FILE


class AgreementRecords:
    """One project's agreement records; safe for many processes appending and reading at once."""

    _cache: dict[Path, tuple[float, int, list[dict[str, Any]]]] = {}
    _cache_lock = threading.Lock()

    def __init__(self, model_dir: Path, project: int | str) -> None:
        self.project = str(project)
        self.path = agreement_path(model_dir, project)

    def add(self, record: dict[str, Any]) -> None:
        """Append ``record`` (it must hold ``annotation``); readers see it as replacing any earlier one."""
        if "annotation" not in record:
            raise ValueError("an agreement record names its annotation")
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # O_APPEND writes of one line under an exclusive lock: concurrent jobs never interleave lines.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def records(self) -> list[dict[str, Any]]:
        """The latest record of each annotation, in annotation order (Label Studio's ids grow with time).
        Cached per process by the file's size and modification time, so ``/metrics`` costs a ``stat``."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return []
        with self._cache_lock:
            cached = self._cache.get(self.path)
            if cached is not None and cached[:2] == (stat.st_mtime, stat.st_size):
                return cached[2]
        latest: dict[int, dict[str, Any]] = {}
        with open(self.path, "rb") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
            for raw in handle:
                try:
                    record = json.loads(raw)
                    latest[int(record["annotation"])] = record
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a full disk: the others still count
        out = [latest[k] for k in sorted(latest)]
        with self._cache_lock:
            self._cache[self.path] = (stat.st_mtime, stat.st_size, out)
        return out


def all_records(model_dir: Path) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """``(project, records)`` of every project under ``model_dir`` that has agreement records."""
    root = Path(model_dir)
    if not root.is_dir():
        return
    for path in sorted(root.glob(f"project-*/{AGREEMENT_FILE}")):
        project = path.parent.name.removeprefix("project-")
        yield project, AgreementRecords(root, project).records()


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per version: annotations compared, mean IoU, pixel accuracy, kept share, and mean IoU per label."""
    by_version: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_version.setdefault(str(record.get("version")), []).append(record)
    out = []
    for version, rows in by_version.items():
        labels: dict[str, list[float]] = {}
        for row in rows:
            for name, iou in row.get("per_label", {}).items():
                labels.setdefault(name, []).append(float(iou))
        out.append(
            {
                "version": version,
                "annotations": len(rows),
                "mean_iou": _mean(r["mean_iou"] for r in rows),
                "pixel_accuracy": _mean(r["pixel_accuracy"] for r in rows),
                "kept": _mean(r["kept"] for r in rows),
                "per_label": {name: _mean(values) for name, values in sorted(labels.items())},
                "first_annotation": rows[0]["annotation"],
                "last_annotation": rows[-1]["annotation"],
            }
        )
    return out


def _mean(values: Any) -> float:
    values = [float(v) for v in values]
    return round(sum(values) / len(values), 4) if values else 0.0


# ----------------------------------------------------------------------------- comparing one annotation
def proposal_for(annotation: dict[str, Any], predictions: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The prediction the annotator started from: the one Label Studio names as the annotation's parent, else
    the task's latest prediction made before the annotation (the one its editor showed), else the latest."""
    usable = [p for p in predictions if isinstance(p, dict) and isinstance(p.get("result"), list)]
    if not usable:
        return None
    parent = annotation.get("parent_prediction")
    for prediction in usable:
        if parent is not None and prediction.get("id") == parent:
            return prediction
    created = str(annotation.get("created_at") or "")
    before = [p for p in usable if created and str(p.get("created_at") or "") <= created]
    return max(before or usable, key=lambda p: (str(p.get("created_at") or ""), int(p.get("id") or 0)))


def _size(*results: Any) -> tuple[int, int]:
    """The image size the regions were drawn on (brush RLEs carry it; percent polygons fit any grid)."""
    for result in results:
        for region in result if isinstance(result, list) else []:
            if isinstance(region, dict) and region.get("original_height") and region.get("original_width"):
                return int(region["original_height"]), int(region["original_width"])
    return PERCENT_GRID, PERCENT_GRID


def compare_annotation(
    annotation: dict[str, Any],
    prediction: dict[str, Any],
    control: LabelControl,
    max_pixels: int = 50_000_000,
) -> dict[str, Any]:
    """The agreement record of ``annotation`` against ``prediction`` (Label Studio objects).

    Raises :class:`AnnotationError` when either cannot be read as masks."""
    height, width = _size(prediction.get("result"), annotation.get("result"))
    proposed = label_map(prediction, control, height, width, max_pixels)
    submitted = label_map(annotation, control, height, width, max_pixels)
    agreement = compare_label_maps(proposed, submitted, control.labels)
    return {
        "annotation": int(annotation["id"]),
        "task": int(annotation.get("task") or prediction.get("task") or 0),
        "version": str(prediction.get("model_version") or "unknown"),
        "prediction": prediction.get("id"),
        **agreement.to_dict(),
        "pixels": int(height * width),
        "compared": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ----------------------------------------------------------------------------- reading Label Studio
class AnnotationSource:
    """What a comparison reads from one project's Label Studio: its control, annotations and predictions."""

    def __init__(self, auth: LabelStudioAuth, project: int, retries: int = 2, timeout: float = 30.0) -> None:
        self.auth, self.project, self.timeout = auth, int(project), timeout
        self.session = retrying_session(retries)

    def _get(self, path: str, **params: Any) -> Any:
        url = f"{self.auth.url}{path}"
        try:
            response = self.session.get(url, params=params, headers=self.auth.headers(), timeout=self.timeout)
            response.raise_for_status()
            return response.json()
        except (requests.RequestException, ValueError) as exc:
            raise ProjectDataError(f"could not read {path} from Label Studio at {self.auth.url}: {exc}") from exc

    def control(self) -> LabelControl:
        info = self._get(f"/api/projects/{self.project}")
        try:
            return parse_label_config(info["label_config"]).controls[0]
        except (KeyError, TypeError, IndexError) as exc:
            raise ProjectDataError(f"project {self.project} has no brush or polygon labels to compare") from exc

    def annotation(self, annotation_id: int) -> dict[str, Any]:
        return self._get(f"/api/annotations/{int(annotation_id)}/")

    def predictions(self, task: int) -> list[dict[str, Any]]:
        found = self._get("/api/predictions/", task=int(task))
        return found if isinstance(found, list) else found.get("results", [])

    def annotations(self) -> Iterator[dict[str, Any]]:
        """Every annotation of the project, task by task (pages of Label Studio's task list)."""
        page = 1
        while True:
            body = self._get(
                "/api/tasks/", project=self.project, page=page, page_size=100, fields="all", only_annotated="true"
            )
            tasks = body.get("tasks", []) if isinstance(body, dict) else body
            for task in tasks:
                for annotation in task.get("annotations") or []:
                    yield {**annotation, "task": annotation.get("task") or task.get("id")}
            if not tasks or len(tasks) < 100:
                return
            page += 1


def compare_and_keep(
    source: AnnotationSource,
    records: AgreementRecords,
    annotation: dict[str, Any],
    control: LabelControl,
    max_pixels: int,
) -> dict[str, Any]:
    """Compare one annotation with its task's proposal and keep the record; returns the record, or
    ``{"annotation", "skipped": reason}`` when there is nothing to compare."""
    ident = {"annotation": annotation.get("id"), "task": annotation.get("task")}
    if not accepted(annotation):
        return {**ident, "skipped": "the annotation was cancelled or rejected"}
    proposal = proposal_for(annotation, source.predictions(int(annotation["task"])))
    if proposal is None:
        return {**ident, "skipped": "the task holds no prediction to compare with"}
    try:
        record = compare_annotation(annotation, proposal, control, max_pixels)
    except AnnotationError as exc:
        return {**ident, "skipped": f"its masks cannot be read: {exc}"}
    records.add(record)
    return record


def publish_agreement(model_dir: Path, metrics: Any) -> None:
    """Every project's agreement records into ``/metrics``'s histogram, by project and version."""
    series: dict[tuple[str, ...], list[float]] = {}
    for project, records in all_records(model_dir):
        for record in records:
            series.setdefault((project, str(record.get("version"))), []).append(float(record["mean_iou"]))
    metrics.set_distribution("maskclip_annotation_agreement_iou", series)
