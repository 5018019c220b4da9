"""Making a trained student active: one process at a time per project, and only while it is still the better model.

Workers on several hosts may finish training for one project close together
(a job presumed lost that was only cut off from Redis, say). Each activation
takes the project's Redis lock, checks that its job still owns the project's
training, and, if another student became active since the candidate was
judged, judges it again against that one. The pointer file itself is written
atomically by the registry, so a worker killed mid-activation leaves the old
pointer or the new one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from redis import Redis
from redis.exceptions import LockError, RedisError

from maskclip_engine.students.registry import ModelRegistry, StudentVersion
from maskclip_service.defaults import ACTIVATION_LOCK_S
from maskclip_service.training_queue import activation_lock, claim, owner

from .candidate import Candidate
from .follow_ups import queue_after_promotion

log = logging.getLogger(__name__)


def promote_candidate(
    candidate: Candidate, version: StudentVersion, judged_against: str | None
) -> tuple[bool, str | None]:
    """Make a judged candidate, stored as ``version``, active if it still should be (:func:`promote`), and queue
    its proposals everywhere once it is; returns ``(activated, why not)``."""

    def rejudge() -> tuple[bool, str]:
        again = candidate.judge()
        return again.promoted, again.reason

    job = candidate.job
    connection, job_id = (job.connection, job.id) if job is not None else (None, None)
    promoted, refused = promote(connection, candidate.registry, version, judged_against, rejudge, job_id)
    if promoted:  # not when activation found a newer job or a better model
        queue_after_promotion(candidate.project, version.name)  # the student's proposals everywhere
    return promoted, refused


def promote(
    connection: Redis | None,
    registry: ModelRegistry,
    version: StudentVersion,
    judged_against: str | None,
    rejudge: Callable[[], tuple[bool, str]],
    job_id: str | None = None,
    lock_timeout: float = ACTIVATION_LOCK_S,
) -> tuple[bool, str | None]:
    """Activate ``version`` if it still should be; returns ``(activated, why not)``.

    ``judged_against`` is the active version's name (None: none) when the
    candidate was judged; ``rejudge()`` judges it again against whatever is
    active now and returns ``(still better, reason)``.
    """
    project = version.project
    if connection is None:  # run outside a queue: this process is the only writer
        registry.activate(version)
        return True, None
    lock = activation_lock(connection, project, lock_timeout)
    try:
        acquired = lock.acquire()
    except RedisError as exc:
        return False, f"kept, not promoted: Redis is unreachable and activation needs its lock ({exc})"
    if not acquired:
        return False, f"kept, not promoted: another process held project {project}'s activation lock too long"
    try:
        if job_id is not None and claim(connection, project, job_id) is not True:
            return False, (
                f"kept, not promoted: job {job_id} no longer owns project {project}'s training "
                f"(now {_owner(connection, project)}); the newer job decides"
            )
        now_active = registry.active_name(project)
        if now_active != judged_against:
            better, reason = rejudge()
            if not better:
                return False, f"{reason} (judged again: {now_active} became active while this job trained)"
        registry.activate(version)
        log.info("project %s: %s is active", project, version.name)
        return True, None
    finally:
        try:
            lock.release()
        except (LockError, RedisError) as exc:  # expired or Redis gone: the lock's timeout frees it
            log.warning("project %s: activation lock not released cleanly: %s", project, exc)


def _owner(connection: Redis, project: str) -> str:
    try:
        return owner(connection, project) or "no job"
    except RedisError:
        return "unknown: Redis unreachable"
