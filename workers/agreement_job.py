"""Jobs that compare annotations with the proposals their tasks held (see :mod:`ls_integration.agreement`).

``compare_annotation`` runs for each ANNOTATION_CREATED / ANNOTATION_UPDATED
webhook; ``compare_project`` compares every existing annotation of a project
(queued, or run in a terminal by ``maskclip agreement --project ID``). Both keep
their records in ``MODEL_DIR/project-N/agreement.jsonl``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from rq import get_current_job

from ls_integration.agreement import AgreementRecords, AnnotationSource, compare_and_keep, summarise
from ls_integration.connection import require_label_studio
from maskclip_service.settings import Settings

log = logging.getLogger(__name__)

Report = Callable[[dict], None]


def _source(settings: Settings, project: int) -> AnnotationSource:
    return AnnotationSource(require_label_studio(settings, project), project, retries=settings.fetch_retries)


def compare_annotation(project: int, annotation: int) -> dict[str, Any]:
    """Compare one annotation (read afresh from Label Studio, so an update compares its latest state)."""
    settings = Settings.from_env()
    source = _source(settings, project)
    record = compare_and_keep(
        source,
        AgreementRecords(settings.model_dir, project),
        source.annotation(annotation),
        source.control(),
        settings.max_image_pixels,
    )
    if "skipped" in record:
        log.info("project %s, annotation %s: not compared: %s", project, annotation, record["skipped"])
    return record


def compare_project(project: int, report: Report | None = None) -> dict[str, Any]:
    """Compare every annotation of ``project``; returns counts and the per-version summary."""
    settings = Settings.from_env()
    report = report or _job_meta
    source = _source(settings, project)
    control = source.control()
    records = AgreementRecords(settings.model_dir, project)
    compared, skipped = 0, []
    for annotation in source.annotations():
        record = compare_and_keep(source, records, annotation, control, settings.max_image_pixels)
        if "skipped" in record:
            skipped.append(record)
        else:
            compared += 1
        report({"phase": "comparing", "compared": compared, "skipped": len(skipped)})
    result = {
        "project": project,
        "compared": compared,
        "skipped": skipped,
        "agreement": summarise(records.records()),
    }
    report({"phase": "done", "compared": compared, "skipped": len(skipped)})
    return result


def _job_meta(fields: dict) -> None:
    job = get_current_job()
    if job is not None:
        job.meta.update(fields)
        job.save_meta()
