"""Reviewing a project's accepted annotations: which are probably wrong, shown as pictures.

``review_project`` runs as a queued job (after every training job, or on
request) and under ``maskclip review`` in a terminal. The review is kept in the
project's folder (``MODEL_DIR/project-N/reviews/<time>/``), where the backend
serves the latest at ``/review/<project>``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rq import get_current_job

from ls_integration.connection import require_label_studio
from ls_integration.errors import ProjectDataError
from ls_integration.training_data import read_project
from maskclip_engine import LabelSet
from maskclip_engine.review.confident_learning import ReviewConfig, review_annotations
from maskclip_engine.review.report import ReviewedItem, mark_latest, new_review_folder, write_report
from maskclip_service.settings import Settings

from .context import shared_segmenter

log = logging.getLogger(__name__)

Report = Callable[[dict], None]


def review_project(
    project: int, trigger: str = "manual", out: str | None = None, report: Report | None = None
) -> dict[str, Any]:
    """Review every accepted annotation of ``project``; returns the review's summary (its folder included)."""
    settings = Settings.from_env()
    report = report or _job_meta
    report({"phase": "loading model"})
    segmenter = shared_segmenter(settings).with_options(settings.segment)
    auth = require_label_studio(settings, project)  # also where the review's links point
    data = read_project(
        settings,
        project,
        short_side=max(settings.train_crop, settings.segment.short_side),
        auth=auth,
        encode=lambda image: segmenter.encode(image, mode="whole"),
        progress=lambda done, total: report({"phase": "fetching data", "fetched": done, "tasks": total}),
    )
    if not data.annotated_tasks:
        raise ProjectDataError(f"project {project} has no accepted annotations to review.")
    labels = LabelSet.parse([list(p) for p in data.control.prompts])
    # Fold students train like the project's own, on half its schedule: they judge, they are not served.
    config = ReviewConfig(
        iterations=max(50, settings.train_iterations // 2),
        crop=settings.train_crop,
        lr=settings.train_lr,
        min_iterations=settings.train_min_iterations,
    )
    started = time.time()
    annotated = [a.item for a in data.annotated_tasks]
    plain = [item for item in data.train if item.labels is None]
    reviews = review_annotations(segmenter, annotated, plain, labels, config, progress=report)
    summary = {
        "project": project,
        "trigger": trigger,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "judge": reviews[0].judge if reviews else "",
        "flag_below": config.flag_below,
        "seconds": round(time.time() - started, 1),
    }
    items = [ReviewedItem(a.task, a.annotation, a.item.image, a.item.labels) for a in data.annotated_tasks]
    link = lambda task: f"{auth.url}/projects/{project}/data?task={task}"  # noqa: E731
    report({"phase": "writing the review"})
    folder = new_review_folder(settings.model_dir, project, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    document = write_report(folder, reviews, items, labels.names, summary, link)
    mark_latest(folder)
    if out is not None:
        write_report(Path(out), reviews, items, labels.names, summary, link)
    flagged = sum(row["flagged"] for row in document["annotations"])
    result = {**summary, "annotations": len(reviews), "flagged": flagged, "folder": str(folder)}
    report({"phase": "done", **result})
    log.info("project %s: reviewed %d annotations, %d flagged (%s)", project, len(reviews), flagged, folder)
    return result


_last_save = [0.0]


def _job_meta(fields: dict) -> None:
    """Progress into the job's meta: at most once a second, and always when the phase is "done"."""
    job = get_current_job()
    if job is None:
        return
    job.meta.update(fields)
    now = time.time()
    if now - _last_save[0] >= 1.0 or fields.get("phase") == "done":
        job.meta["heartbeat"] = now
        job.save_meta()
        _last_save[0] = now
