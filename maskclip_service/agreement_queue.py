"""Queueing the comparison of annotations with the proposals their tasks held (the work runs on a worker).

An ANNOTATION_CREATED or ANNOTATION_UPDATED webhook queues one job naming the
annotation by id; the job reads the annotation and the task's predictions from
Label Studio itself, so no mask travels through Redis and an update queued
twice compares the latest state twice (the later record wins).
"""

from __future__ import annotations

from redis import Redis
from rq import Queue

from .defaults import DAY_S, FAILURE_TTL_S, JOB_TIMEOUT_S, QUEUE_NAME
from .job_paths import COMPARE_ANNOTATION, COMPARE_PROJECT

COMPARE_TIMEOUT_S = 300  # one annotation: a few Label Studio reads and array passes
PROJECT_TIMEOUT_S = JOB_TIMEOUT_S  # a whole project's annotations: as long as any long job may run


def enqueue_comparison(connection: Redis, project: int, annotation: int, queue_name: str = QUEUE_NAME) -> str:
    """Queue the comparison of ``annotation`` in ``project``; returns the job id."""
    job = Queue(queue_name, connection=connection).enqueue(
        COMPARE_ANNOTATION,
        project,
        annotation,
        job_timeout=COMPARE_TIMEOUT_S,
        result_ttl=DAY_S,
        failure_ttl=FAILURE_TTL_S,
        meta={"project": project, "annotation": annotation, "phase": "queued", "kind": "agreement"},
        description=f"compare annotation {annotation} of project {project} with its proposal",
    )
    return job.id


def enqueue_project_comparison(connection: Redis, project: int, queue_name: str = QUEUE_NAME) -> str:
    """Queue the comparison of every annotation of ``project``; returns the job id."""
    job = Queue(queue_name, connection=connection).enqueue(
        COMPARE_PROJECT,
        project,
        job_timeout=PROJECT_TIMEOUT_S,
        result_ttl=DAY_S,
        failure_ttl=FAILURE_TTL_S,
        meta={"project": project, "phase": "queued", "kind": "agreement"},
        description=f"compare every annotation of project {project} with its proposal",
    )
    return job.id
