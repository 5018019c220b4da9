"""The training queue: enqueueing, coalescing triggers, and counting annotations.

At most one queued or running training job exists per project. A Redis key
``maskclip:training:<project>`` names it; triggers that find a live job there
coalesce into it.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from redis import Redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

LIVE = {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED}
_RACE_GRACE_S = 30  # a key whose job is not saved yet is another trigger enqueueing right now
HEARTBEAT_S = 10  # a running training job refreshes meta["heartbeat"] this often
LOST_AFTER_S = 120  # a "started" job silent for this long lost its worker (killed, machine gone)

_COMPARE_AND_DELETE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


def connect(redis_url: str) -> Redis:
    """A Redis connection from a URL (``redis://``, ``rediss://`` or ``unix://``)."""
    return Redis.from_url(redis_url)


def lock_key(project: int | str) -> str:
    return f"maskclip:training:{project}"


def enqueue_training(
    connection: Redis,
    project: int,
    *,
    trigger: str,
    queue_name: str = "maskclip-training",
    job_timeout: int = 6 * 3600,
    kwargs: dict[str, Any] | None = None,
) -> tuple[str, bool]:
    """Enqueue training for ``project`` unless a job for it is live; returns ``(job id, created)``."""
    key = lock_key(project)
    queue = Queue(queue_name, connection=connection)
    for _ in range(5):
        job_id = f"train-p{project}-{uuid.uuid4().hex[:12]}"
        if connection.set(key, f"{job_id}|{time.time():.0f}", nx=True, ex=job_timeout + 3600):
            queue.enqueue(
                "workers.jobs.train_project",
                project,
                trigger=trigger,
                **(kwargs or {}),
                job_id=job_id,
                job_timeout=job_timeout,
                result_ttl=7 * 24 * 3600,
                failure_ttl=7 * 24 * 3600,
                meta={"project": project, "trigger": trigger, "phase": "queued"},
                description=f"train project {project} ({trigger})",
            )
            return job_id, True
        held = connection.get(key)
        if held is None:
            continue
        existing, _, stamp = held.decode().partition("|")
        try:
            job = Job.fetch(existing, connection=connection)
            if job.get_status() in LIVE and not _lost(job):
                return existing, False
        except NoSuchJobError:
            if time.time() - float(stamp or 0) < _RACE_GRACE_S:
                return existing, False
        release(connection, project, held.decode())  # the job it names is over: take its place
    raise RuntimeError(f"could not enqueue training for project {project}: the queue key keeps changing")


def _lost(job: Job) -> bool:
    """A started job whose heartbeat stopped: its worker died. It is marked failed so listings tell the truth."""
    if job.get_status() != JobStatus.STARTED:
        return False
    beat = job.meta.get("heartbeat")
    if beat is None or time.time() - float(beat) < LOST_AFTER_S:
        return False
    job.meta["phase"] = "lost: its worker stopped"
    job.save_meta()
    job.set_status(JobStatus.FAILED)
    return True


def release(connection: Redis, project: int | str, held: str | None = None) -> None:
    """Forget the live job of ``project`` (only if the key still holds ``held``, when given)."""
    key = lock_key(project)
    if held is None:
        connection.delete(key)
    else:
        connection.eval(_COMPARE_AND_DELETE, 1, key, held)


def release_job(connection: Redis, project: int | str, job_id: str) -> None:
    """Called by a finishing job: drop the key if it still names this job."""
    held = connection.get(lock_key(project))
    if held is not None and held.decode().split("|", 1)[0] == job_id:
        release(connection, project, held.decode())


def count_annotation(connection: Redis, project: int, every: int) -> bool:
    """Count one new or updated annotation; True once every ``every`` of them."""
    if every <= 0:
        return False
    key = f"maskclip:annotations:{project}"
    count = connection.incr(key)
    if count >= every:
        connection.delete(key)
        return True
    return False


def recent_jobs(connection: Redis, queue_name: str = "maskclip-training", limit: int = 20) -> list[Job]:
    """Queued, running, finished and failed training jobs, newest first."""
    queue = Queue(queue_name, connection=connection)
    ids = set(queue.get_job_ids())
    for registry in (queue.started_job_registry, queue.finished_job_registry, queue.failed_job_registry):
        ids.update(registry.get_job_ids())
    jobs = [job for job in Job.fetch_many(list(ids), connection=connection) if job is not None]
    return sorted(jobs, key=lambda j: j.enqueued_at or j.created_at, reverse=True)[:limit]
