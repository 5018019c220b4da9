"""Reviews of a project's annotations on the queue: at most one queued or running review per project.

A Redis key ``maskclip:review:<project>`` names the live review job; a trigger
that finds it live joins it instead of queueing another.
"""

from __future__ import annotations

import uuid

from redis import Redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job

from .defaults import FAILURE_TTL_S, HOUR_S, QUEUE_NAME, RESULT_TTL_S, REVIEW_TIMEOUT_S
from .job_paths import REVIEW_PROJECT
from .training_queue import LIVE


def review_key(project: int | str) -> str:
    return f"maskclip:review:{project}"


def enqueue_review(
    connection: Redis, project: int, *, trigger: str, queue_name: str = QUEUE_NAME
) -> tuple[str, bool]:
    """Queue a review of ``project``'s annotations unless one is live; returns ``(job id, created)``."""
    key = review_key(project)
    held = connection.get(key)
    if held is not None:
        try:
            if Job.fetch(held.decode(), connection=connection).get_status() in LIVE:
                return held.decode(), False
        except NoSuchJobError:
            pass
    job_id = f"review-p{project}-{uuid.uuid4().hex[:12]}"
    if not connection.set(key, job_id, ex=REVIEW_TIMEOUT_S + HOUR_S, nx=held is None, xx=held is not None):
        return (connection.get(key) or job_id.encode()).decode(), False  # another trigger queued one first
    Queue(queue_name, connection=connection).enqueue_call(
        REVIEW_PROJECT,
        args=(project,),
        kwargs={"trigger": trigger},
        job_id=job_id,
        timeout=REVIEW_TIMEOUT_S,
        result_ttl=RESULT_TTL_S,
        failure_ttl=FAILURE_TTL_S,
        meta={"project": project, "trigger": trigger, "phase": "queued", "kind": "review"},
        description=f"review project {project}'s annotations ({trigger})",
    )
    return job_id, True
