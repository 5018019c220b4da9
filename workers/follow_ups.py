"""What a finished job queues next: a promoted student's proposals everywhere, a review of the annotations.

Neither may undo the job that queues it: each logs a failure and returns
``None`` rather than raising.
"""

from __future__ import annotations

import logging

from rq import get_current_job

from maskclip_service.preannotation_runs import queue_preannotation
from maskclip_service.redis_connection import connect
from maskclip_service.review_queue import enqueue_review
from maskclip_service.settings import Settings

log = logging.getLogger(__name__)


def _connection(settings: Settings):
    job = get_current_job()
    return job.connection if job is not None else connect(settings.redis_url or "")


def queue_after_promotion(project: int, version: str) -> str | None:
    """Called by a training job that promoted ``version``: write its proposals everywhere."""
    try:
        settings = Settings.from_env()
        run, status = queue_preannotation(
            _connection(settings), settings, project, version=version, trigger="promotion", set_project_version=True
        )
        log.info("project %s: %s pre-annotation run %s for %s", project, status, run, version)
        return run
    except Exception:  # the promotion stands even if its proposals cannot be queued now
        log.exception("project %s: could not queue pre-annotation with %s", project, version)
        return None


def queue_review(project: int, trigger: str) -> str | None:
    """Queue a review of the project's annotations (after a training job); returns the job id."""
    try:
        settings = Settings.from_env()
        job_id, _ = enqueue_review(_connection(settings), project, trigger=trigger, queue_name=settings.queue_name)
        return job_id
    except Exception:  # the training result stands even if its review cannot be queued now
        log.exception("project %s: could not queue a review", project)
        return None
