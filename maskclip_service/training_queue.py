"""The training queue: enqueueing, coalescing triggers, lost jobs, the activation lock, counting annotations.

At most one queued or running training job exists per project. A Redis key
``maskclip:training:<project>`` names it; triggers that find a live job there
coalesce into it.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from redis import Redis
from redis.exceptions import RedisError, WatchError
from redis.lock import Lock
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from .defaults import (
    ACTIVATION_LOCK_S,
    FAILURE_TTL_S,
    JOB_TIMEOUT_S,
    LOST_AFTER_S,
    QUEUE_NAME,
    RESULT_TTL_S,
    TRAINING_KEY_TTL_S,
)
from .job_paths import TRAIN_PROJECT

LIVE = {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED}

log = logging.getLogger(__name__)

_COMPARE_AND_DELETE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""
# A job owns its project while the key names it; a key lost with Redis's data (a restart before its
# last save) is taken back, so a restart alone never stops a job.
_CLAIM = """
local held = redis.call('get', KEYS[1])
if not held then
  redis.call('set', KEYS[1], ARGV[1] .. '|' .. ARGV[2], 'EX', ARGV[3])
  return 1
end
if string.sub(held, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. '|' then return 1 end
return 0
"""


def lock_key(project: int | str) -> str:
    return f"maskclip:training:{project}"


def enqueue_training(
    connection: Redis,
    project: int,
    *,
    trigger: str,
    queue_name: str = QUEUE_NAME,
    job_timeout: int = JOB_TIMEOUT_S,
    kwargs: dict[str, Any] | None = None,
) -> tuple[str, bool]:
    """Enqueue training for ``project`` unless a job for it is live; returns ``(job id, created)``."""
    key = lock_key(project)
    ttl = job_timeout + (TRAINING_KEY_TTL_S - JOB_TIMEOUT_S)  # the key outlives the job it names
    queue = Queue(queue_name, connection=connection)
    for _ in range(5):
        held = connection.get(key)
        lost = None
        if held is not None:
            existing = held.decode().split("|", 1)[0]
            try:
                job = Job.fetch(existing, connection=connection)
                if job.get_status() in LIVE:
                    if not _silent(job):
                        return existing, False
                    lost = job
            except NoSuchJobError:
                pass  # key and job are written together, so its job expired or was deleted: it is over
        job_id = f"train-p{project}-{uuid.uuid4().hex[:12]}"
        if not _claim_and_enqueue(connection, queue, key, held, job_id, ttl, project, trigger, job_timeout, kwargs):
            continue  # another trigger moved the key first: look again
        if lost is not None:
            _mark_lost(lost, job_id)
        return job_id, True
    raise RuntimeError(f"could not enqueue training for project {project}: the queue key keeps changing")


def _claim_and_enqueue(
    connection: Redis,
    queue: Queue,
    key: str,
    expected: bytes | None,
    job_id: str,
    ttl: int,
    project: int,
    trigger: str,
    job_timeout: int,
    kwargs: dict[str, Any] | None,
) -> bool:
    """Point the project's key at a new job and enqueue that job in one transaction, if the key still holds
    ``expected``: the lost-job decision and the takeover are atomic, and a Redis failure half-way leaves neither."""
    with connection.pipeline() as pipe:
        try:
            pipe.watch(key)
            if pipe.get(key) != expected:
                return False
            pipe.multi()
            pipe.set(key, f"{job_id}|{time.time():.0f}", ex=ttl)
            queue.enqueue_call(
                TRAIN_PROJECT,
                args=(project,),
                kwargs={"trigger": trigger, **(kwargs or {})},
                job_id=job_id,
                timeout=job_timeout,
                result_ttl=RESULT_TTL_S,
                failure_ttl=FAILURE_TTL_S,
                meta={"project": project, "trigger": trigger, "phase": "queued"},
                description=f"train project {project} ({trigger})",
                pipeline=pipe,
            )
            pipe.execute()
            return True
        except WatchError:
            return False


def _silent(job: Job) -> bool:
    """A started job whose heartbeat stopped: its worker died, or cannot reach Redis."""
    if job.get_status() != JobStatus.STARTED:
        return False
    beat = job.meta.get("heartbeat")
    return beat is not None and time.time() - float(beat) >= LOST_AFTER_S


def _mark_lost(job: Job, successor: str) -> None:
    """Listings tell the truth; if its worker is alive after all, the job sees it lost the project and stops."""
    job.meta["phase"] = f"lost: its worker stopped; replaced by {successor}"
    job.save_meta()
    job.set_status(JobStatus.FAILED)


def claim(connection: Redis, project: int | str, job_id: str, ttl: int = TRAINING_KEY_TTL_S) -> bool | None:
    """Whether ``job_id`` still owns ``project``'s training (retaking a key Redis lost); None: Redis unreachable."""
    try:
        return bool(connection.eval(_CLAIM, 1, lock_key(project), job_id, f"{time.time():.0f}", ttl))
    except RedisError as exc:
        log.warning("could not confirm that job %s still owns project %s: %s", job_id, project, exc)
        return None


def owner(connection: Redis, project: int | str) -> str | None:
    held = connection.get(lock_key(project))
    return held.decode().split("|", 1)[0] if held else None


def activation_lock(connection: Redis, project: int | str, timeout: float = ACTIVATION_LOCK_S) -> Lock:
    """The lock every process holds while it changes ``project``'s active student (it expires if its holder dies)."""
    return connection.lock(f"maskclip:activate:{project}", timeout=timeout, blocking_timeout=timeout)


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
    # One atomic step: concurrent webhooks never both fire nor lose a count.
    return connection.incr(f"maskclip:annotations:{project}") % every == 0


def recent_jobs(connection: Redis, queue_name: str = QUEUE_NAME, limit: int = 20) -> list[Job]:
    """Queued, running, finished and failed training jobs, newest first."""
    queue = Queue(queue_name, connection=connection)
    ids = set(queue.get_job_ids())
    for registry in (queue.started_job_registry, queue.finished_job_registry, queue.failed_job_registry):
        ids.update(registry.get_job_ids())
    jobs = [job for job in Job.fetch_many(list(ids), connection=connection) if job is not None]
    return sorted(jobs, key=lambda j: j.enqueued_at or j.created_at, reverse=True)[:limit]
