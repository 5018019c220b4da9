"""Whole-project pre-annotation runs: their state in Redis, shared by the backend, the CLI and the workers.

A *run* writes predictions of one target version into one project. It is cut
into chunks of tens of tasks; any number of workers take chunks in parallel.
:class:`PreannotationRun` owns every key of a run and every change they go
through (plan, lease, import, give back, finish, abandon); nobody else spells them.

Keys (``R`` is the run id)::

    maskclip:preannotate:<project>:<version>   R while the run is live: later triggers coalesce into it
    maskclip:preannotate-run:R                 hash: project, version, total, done, predicted, failed,
                                               skipped, phase, started, heartbeat, planning, ...
    maskclip:preannotate-run:R:todo            list of chunk numbers nobody has taken yet
    maskclip:preannotate-run:R:chunks          hash chunk number -> JSON list of tasks (id and data)
    maskclip:preannotate-run:R:leases          hash chunk number -> "<owner>|<expiry>" while a worker has it
    maskclip:preannotate-run:R:extra           list of JSON task-id lists (or "*": the whole project)
                                               that triggers added while the run was live
    maskclip:preannotate-run:R:planned         set of task ids already put in a chunk of this run
    maskclip:preannotate-run:R:attempts        hash chunk number -> how often it failed (given up at 3)
    maskclip:preannotate-run:R:planner         held by the run's one planner while it lists tasks
    maskclip:preannotate-run:R:failures        list of JSON {"task", "reason"}: the latest 200 failed tasks

A worker refreshes its lease while it works; a lease that expires (the worker
was killed) is taken over by another worker, so a dead worker loses at most
its chunk. Before importing, a worker checks again which tasks already hold the
target version, so rerunning never duplicates a prediction.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

from redis import Redis
from rq import Queue

from . import chunk_leases
from .defaults import (
    FAILURE_REASON_CHARS,
    FAILURE_TTL_S,
    FAILURES_KEPT,
    FINISHED_RUN_TTL_S,
    JOB_TIMEOUT_S,
    LOST_AFTER_S,
    MAX_ATTEMPTS,
    PLANNER_TTL_S,
    PREANNOTATION_RESULT_TTL_S,
    QUEUE_NAME,
    RUN_TTL_S,
)
from .job_paths import PREANNOTATION_JOBS
from .settings import Settings

WHOLE_PROJECT = "*"
CURRENT = "current"  # the version key of a run that serves whatever the project's current model is
_PREFIX = "maskclip:preannotate-run:"
# The keys beside the state hash that end (expire) with the run; the planner's lock expires by itself.
_PARTS = ("todo", "chunks", "leases", "extra", "planned", "attempts", "failures")

# Atomically: join the live run of (project, version), or claim the key for a new run.
_JOIN_OR_CLAIM = """
local live = redis.call('get', KEYS[1])
if live then
  local state = KEYS[2] .. live
  local beat = tonumber(redis.call('hget', state, 'heartbeat') or '0')
  if redis.call('exists', state) == 1 and tonumber(ARGV[3]) - beat < tonumber(ARGV[4]) then
    redis.call('rpush', state .. ':extra', ARGV[2])
    return {live, 'coalesced'}
  end
  if redis.call('exists', state) == 1 and redis.call('hget', state, 'phase') ~= 'done' then
    redis.call('rpush', state .. ':extra', ARGV[2])
    redis.call('hset', state, 'heartbeat', ARGV[3])
    return {live, 'resumed'}
  end
end
redis.call('set', KEYS[1], ARGV[1])
-- the state exists from the same instant as the key, so a trigger right behind this one joins it
redis.call('hset', KEYS[2] .. ARGV[1], 'heartbeat', ARGV[3], 'phase', 'queued', 'planning', '1')
return {ARGV[1], 'queued'}
"""

# Atomically: a run with no chunk left and none leased either plans again (triggers came in) or ends.
# KEYS: state, todo, leases, extra, live key, then the keys that expire with the run.
_FINISH = """
local state = KEYS[1]
if redis.call('hget', state, 'phase') == 'done' then return 'over' end
if redis.call('llen', KEYS[2]) > 0 or redis.call('hlen', KEYS[3]) > 0 then return 'busy' end
if redis.call('hget', state, 'planning') == '1' then return 'busy' end
if redis.call('llen', KEYS[4]) > 0 then
  redis.call('hset', state, 'planning', '1')
  return 'plan'
end
if redis.call('get', KEYS[5]) == ARGV[1] then redis.call('del', KEYS[5]) end
redis.call('hset', state, 'phase', 'done', 'finished', ARGV[2])
redis.call('expire', state, ARGV[3])
for i = 6, #KEYS do redis.call('expire', KEYS[i], ARGV[3]) end
return 'done'
"""

_INTEGER = re.compile(r"-?[0-9]+")
_DECIMAL = re.compile(r"-?[0-9]*\.[0-9]+(e-?[0-9]+)?|-?[0-9]+e-?[0-9]+")
_DELETE_IF_EQUAL = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


def live_key(project: int | str, version: str | None) -> str:
    return f"maskclip:preannotate:{project}:{version or CURRENT}"


def state_key(run: str) -> str:
    return f"{_PREFIX}{run}"


def _pending_version_key(project: int | str) -> str:
    return f"maskclip:project-version-pending:{project}"


def defer_project_version(connection: Redis, project: int | str, version: str) -> None:
    """Remember that ``project`` should show ``version`` once a task holds one of its predictions (Label Studio
    refuses a project version that no task holds); the next run of that version to finish switches it."""
    connection.set(_pending_version_key(project), version)


def pending_project_version(connection: Redis, project: int | str) -> str | None:
    """The version :func:`defer_project_version` left for ``project``, if any."""
    value = connection.get(_pending_version_key(project))
    return value.decode() if value is not None else None


def clear_pending_project_version(connection: Redis, project: int | str) -> None:
    """The project shows the version it should: nothing waits any more."""
    connection.delete(_pending_version_key(project))


def _now() -> str:
    return f"{time.time():.3f}"


class PreannotationRun:
    """One run's keys in Redis and every transition they go through, as RQ's registries own theirs.

    ``PreannotationRun(connection, run_id)`` is cheap (it reads nothing); build
    one wherever a run is worked on. The methods follow a run's life:
    :meth:`start`; the planner's :meth:`take_planner`, :meth:`scopes`,
    :meth:`add_chunk`, :meth:`planned`; the workers' :meth:`claim`,
    :meth:`renew`, :meth:`record_chunk`, :meth:`give_back`; then
    :meth:`try_finish` or :meth:`abandon`. :meth:`state` and :meth:`failures`
    are what status pages read.
    """

    def __init__(self, connection: Redis, run: str) -> None:
        self.connection = connection
        self.id = run
        self.key = state_key(run)
        self.todo_key, self.chunks_key, self.leases_key = f"{self.key}:todo", f"{self.key}:chunks", f"{self.key}:leases"
        self.extra_key, self.planned_key, self.attempts_key = (
            f"{self.key}:extra",
            f"{self.key}:planned",
            f"{self.key}:attempts",
        )
        self.planner_key, self.failures_key = f"{self.key}:planner", f"{self.key}:failures"

    def __repr__(self) -> str:
        return f"PreannotationRun({self.id!r})"

    # ------------------------------------------------------------ starting
    @classmethod
    def start(
        cls,
        connection: Redis,
        project: int,
        *,
        version: str | None = None,
        task_ids: list[int] | None = None,
        trigger: str = "manual",
        set_project_version: bool = False,
        queue_name: str = QUEUE_NAME,
        lost_after_s: float = LOST_AFTER_S,
    ) -> tuple[PreannotationRun, str]:
        """Queue pre-annotation of ``task_ids`` (or the whole project); returns ``(run, status)``.

        Status is ``queued`` (a new run), ``coalesced`` (joined the live run of the
        same project and version) or ``resumed`` (the live run had gone silent: its
        workers died; it is queued again and finishes what it had left).
        """
        new_id = f"pre-p{project}-{uuid.uuid4().hex[:12]}"
        scope = json.dumps(sorted(int(t) for t in task_ids)) if task_ids is not None else WHOLE_PROJECT
        now = _now()
        live, status = connection.eval(
            _JOIN_OR_CLAIM, 2, live_key(project, version), _PREFIX, new_id, scope, now, lost_after_s
        )
        run = cls(connection, live.decode())
        status = status.decode()
        if set_project_version and status != "queued":  # the joined run switches the project at its end too
            connection.hset(run.key, "set_project_version", 1)
        if status == "coalesced":
            return run, status
        if status == "queued":
            connection.hset(
                run.key,
                mapping={
                    "project": project,
                    "version": version or CURRENT,
                    "version_key": version or CURRENT,
                    "trigger": trigger,
                    "set_project_version": int(set_project_version),
                    "phase": "queued",
                    "started": now,
                    "heartbeat": now,
                    "planning": 1,
                    "total": 0,
                    "done": 0,
                    "predicted": 0,
                    "failed": 0,
                    "skipped": 0,
                    "chunks": 0,
                },
            )
            connection.rpush(run.extra_key, scope)
            connection.expire(run.key, RUN_TTL_S)
        elif connection.exists(run.planner_key):
            return run, "coalesced"  # its planner is alive (it was only queued behind other jobs): it takes the scope
        else:  # resumed: plan again (the planner may have died) and put workers back on what is left
            connection.hset(run.key, "planning", 1)
        run.queue_job("plan_run", queue_name, project)
        return run, status

    def queue_job(self, function: str, queue_name: str, project: int | None = None) -> str:
        """Queue one of the run's jobs (``plan_run`` or ``work_run``); JSON-safe arguments, any worker host can
        take it. Returns the job id."""
        project = self.project() if project is None else project
        job_id = f"{self.id}-{function.split('_')[0]}-{uuid.uuid4().hex[:6]}"
        Queue(queue_name, connection=self.connection).enqueue(
            PREANNOTATION_JOBS[function],
            project,
            self.id,
            job_id=job_id,
            job_timeout=JOB_TIMEOUT_S,
            result_ttl=PREANNOTATION_RESULT_TTL_S,
            failure_ttl=FAILURE_TTL_S,
            meta={"project": project, "run": self.id, "phase": "queued", "kind": "pre-annotation"},
            description=f"pre-annotate project {project} ({function})",
        )
        return job_id

    # ------------------------------------------------------------ reading
    def state(self) -> dict[str, Any]:
        """The run's fields, decoded; numbers as numbers, with ``run`` and ``tasks_per_second``. Empty when the
        run is unknown (never queued, or expired)."""
        out: dict[str, Any] = {}
        for key, value in self.connection.hgetall(self.key).items():
            out[key.decode()] = _number(value.decode())
        if out:
            out["run"] = self.id
            end = float(out.get("finished") or time.time())
            elapsed = max(end - float(out.get("started", end)), 1e-6)
            out["tasks_per_second"] = round(out.get("done", 0) / elapsed, 3)
        return out

    def progress(self) -> dict[str, Any]:
        """What job meta and ``maskclip jobs`` show of the run (:func:`progress_meta` of its state)."""
        return progress_meta(self.state())

    def exists(self) -> bool:
        return bool(self.connection.exists(self.key))

    def project(self) -> int:
        return int(self.connection.hget(self.key, "project") or 0)

    def version(self) -> str:
        """The version the run writes (``current`` until its planner has resolved it)."""
        return (self.connection.hget(self.key, "version") or CURRENT.encode()).decode()

    def failures(self) -> list[dict[str, Any]]:
        """The latest failed tasks (at most ``FAILURES_KEPT``), oldest first: ``{"task": id, "reason": sentence}``."""
        out = []
        for raw in self.connection.lrange(self.failures_key, 0, -1):
            item = json.loads(raw)
            out.append({"task": int(item["task"]), "reason": str(item["reason"])})
        return out

    def nothing_left(self) -> bool:
        """No chunk waits or is leased, no planner is at work and no trigger waits: the run is about to end."""
        with self.connection.pipeline() as pipe:
            pipe.llen(self.todo_key)
            pipe.hlen(self.leases_key)
            pipe.llen(self.extra_key)
            pipe.hget(self.key, "planning")
            todo, leased, extra, planning = pipe.execute()
        return not todo and not leased and not extra and planning != b"1"

    # ------------------------------------------------------------ planning
    def take_planner(self) -> str | None:
        """Become the run's one planner; returns the token to give back to :meth:`release_planner`, or None when
        another planner is at work (it takes the new scopes)."""
        token = uuid.uuid4().hex
        return token if self.connection.set(self.planner_key, token, nx=True, ex=PLANNER_TTL_S) else None

    def release_planner(self, token: str) -> None:
        self.connection.eval(_DELETE_IF_EQUAL, 1, self.planner_key, token)

    def heartbeat(self, planner: bool = False) -> None:
        """The run is alive (triggers join rather than resume it); ``planner``: keep the planner's lock too."""
        self.connection.hset(self.key, "heartbeat", _now())
        if planner:
            self.connection.expire(self.planner_key, PLANNER_TTL_S)

    def begin_listing(self, version: str) -> None:
        """The planner resolved the run's version and lists the project's tasks."""
        self.connection.hset(self.key, mapping={"version": version, "phase": "listing tasks", "heartbeat": _now()})

    def scopes(self) -> list[str]:
        """What triggers asked for since the last planning round: JSON task-id lists, or ``*``."""
        return [s.decode() for s in self.connection.lrange(self.extra_key, 0, -1)]

    def drop_scopes(self, count: int) -> None:
        """Forget the first ``count`` scopes once they are planned (triggers may have added more behind them)."""
        self.connection.ltrim(self.extra_key, count, -1)

    def is_planned(self, task: int) -> bool:
        return bool(self.connection.sismember(self.planned_key, task))

    def add_chunk(self, tasks: list[dict]) -> int:
        """Queue a chunk of tasks (``{"id", "data"}``) for the workers; returns its number."""
        number = int(self.connection.hincrby(self.key, "chunks", 1))
        with self.connection.pipeline() as pipe:
            pipe.hset(self.chunks_key, number, json.dumps(tasks))
            pipe.sadd(self.planned_key, *[t["id"] for t in tasks])
            pipe.rpush(self.todo_key, number)
            pipe.execute()
        return number

    def count_listed(self, considered: int, skipped: int) -> None:
        """Tasks a planning round considered, and of those the ones it skipped (they count as done)."""
        with self.connection.pipeline() as pipe:
            pipe.hincrby(self.key, "total", considered)
            pipe.hincrby(self.key, "done", skipped)
            pipe.hincrby(self.key, "skipped", skipped)
            pipe.execute()

    def planned(self) -> int:
        """A planning round ended: the run is predicting. Returns how many chunks wait or are leased."""
        self.connection.hset(self.key, mapping={"planning": 0, "phase": "predicting", "heartbeat": _now()})
        return int(self.connection.llen(self.todo_key)) + self.leased()

    # ------------------------------------------------------------ working
    def claim(self, owner: str, lease_s: float) -> str | None:
        """Lease the next chunk, or one whose holder went silent, to ``owner``; None when none is left."""
        return chunk_leases.claim(self.connection, self.todo_key, self.leases_key, owner, lease_s)

    def renew(self, chunk: str, owner: str, lease_s: float) -> bool:
        """Extend ``owner``'s lease on ``chunk``; False when another worker took it over."""
        return chunk_leases.renew(self.connection, self.leases_key, chunk, owner, lease_s)

    def release(self, chunk: str, owner: str) -> bool:
        """Give up ``owner``'s lease on ``chunk``; False when it was not ours any more."""
        return chunk_leases.renew(self.connection, self.leases_key, chunk, owner, None)

    def leased(self) -> int:
        """How many chunks workers hold right now."""
        return int(self.connection.hlen(self.leases_key))

    def lease_owners(self) -> list[str]:
        """Who holds each leased chunk right now (one entry per chunk; a worker holding two appears twice)."""
        return [held.decode().rsplit("|", 1)[0] for held in self.connection.hvals(self.leases_key)]

    def chunk_tasks(self, chunk: str) -> list[dict]:
        """A chunk's tasks, ``{"id", "data"}`` each (empty when the run expired)."""
        return json.loads(self.connection.hget(self.chunks_key, chunk) or b"[]")

    def record_chunk(
        self, *, tasks: int, predicted: int, skipped: int, failed: list[tuple[int, str]] | None = None
    ) -> None:
        """A chunk of ``tasks`` ended: ``predicted`` imported, ``skipped`` held the version already, ``failed``
        as ``(task, reason)`` got none (they count, and their reasons are kept)."""
        failed = failed or []
        with self.connection.pipeline() as pipe:
            pipe.hincrby(self.key, "done", tasks)
            pipe.hincrby(self.key, "predicted", predicted)
            pipe.hincrby(self.key, "failed", len(failed))
            pipe.hincrby(self.key, "skipped", skipped)
            pipe.hset(self.key, "heartbeat", _now())
            self._push_failures(pipe, failed)
            pipe.execute()

    def give_back(self, chunk: str, owner: str, reason: str, max_attempts: int = MAX_ATTEMPTS) -> str:
        """Return a failed chunk: ``queued again`` for another attempt (here or on another worker), ``given up``
        after ``max_attempts`` (its tasks count as failed, with ``reason``; a later run retries them), or
        ``not ours`` when another worker had taken it over already."""
        attempts = int(self.connection.hincrby(self.attempts_key, chunk, 1))
        if not self.release(chunk, owner):
            return "not ours"
        if attempts < max_attempts:
            self.connection.rpush(self.todo_key, chunk)
            return "queued again"
        tasks = self.chunk_tasks(chunk)
        why = f"gave up after {attempts} attempts: {reason}"
        with self.connection.pipeline() as pipe:
            pipe.hincrby(self.key, "done", len(tasks))
            pipe.hincrby(self.key, "failed", len(tasks))
            self._push_failures(pipe, [(t["id"], why) for t in tasks])
            pipe.execute()
        return "given up"

    def _push_failures(self, pipe: Any, failed: list[tuple[int, str]]) -> None:
        if not failed:
            return
        items = [json.dumps({"task": int(t), "reason": _short(r)}) for t, r in failed[-FAILURES_KEPT:]]
        pipe.rpush(self.failures_key, *items)
        pipe.ltrim(self.failures_key, -FAILURES_KEPT, -1)
        pipe.expire(self.failures_key, RUN_TTL_S)

    # ------------------------------------------------------------ ending
    def try_finish(self) -> str:
        """``done`` (the run ended now and its key is free), ``plan`` (triggers came in: plan again), ``busy``
        (chunks are left or leased) or ``over`` (it had ended already)."""
        project, version_key = self._live_parts()
        keys = [self.key, self.todo_key, self.leases_key, self.extra_key, live_key(project, version_key)]
        keys += [f"{self.key}:{part}" for part in _PARTS]
        return self.connection.eval(_FINISH, len(keys), *keys, self.id, _now(), FINISHED_RUN_TTL_S).decode()

    def abandon(self, reason: str) -> None:
        """End the run without finishing it: its phase says why, and its (project, version) key is free again."""
        project, version_key = self._live_parts()
        self.connection.eval(_DELETE_IF_EQUAL, 1, live_key(project, version_key), self.id)
        self.connection.hset(self.key, mapping={"phase": "done", "error": reason, "finished": _now()})
        for key in [self.key, *(f"{self.key}:{part}" for part in _PARTS)]:
            self.connection.expire(key, FINISHED_RUN_TTL_S)

    def _live_parts(self) -> tuple[str, str]:
        project, version_key = self.connection.hmget(self.key, "project", "version_key")
        return (project or b"").decode(), (version_key or CURRENT.encode()).decode()


def _number(text: str) -> int | float | str:
    """A hash field as stored: counters are integers, times decimals, everything else text (a version that
    looks like ``inf`` stays text)."""
    if _INTEGER.fullmatch(text):
        return int(text)
    return float(text) if _DECIMAL.fullmatch(text) else text


def _short(reason: str) -> str:
    reason = " ".join(str(reason).split())
    return reason if len(reason) <= FAILURE_REASON_CHARS else reason[: FAILURE_REASON_CHARS - 3] + "..."


# ------------------------------------------------------------------ module-level readers and starters
def start_run(connection: Redis, project: int, **options: Any) -> tuple[str, str]:
    """:meth:`PreannotationRun.start`, returning ``(run id, status)``."""
    run, status = PreannotationRun.start(connection, project, **options)
    return run.id, status


def queue_preannotation(
    connection: Redis,
    settings: Settings,
    project: int,
    *,
    trigger: str,
    version: str | None = None,
    task_ids: list[int] | None = None,
    set_project_version: bool = False,
) -> tuple[str, str]:
    """Start (or join) a run on the queue ``settings`` name; what the backend, the CLI and follow-ups call."""
    return start_run(
        connection,
        project,
        version=version,
        task_ids=task_ids,
        trigger=trigger,
        set_project_version=set_project_version,
        queue_name=settings.queue_name,
        lost_after_s=LOST_AFTER_S,
    )


def state(connection: Redis, run: str) -> dict[str, Any]:
    """The run's fields, decoded; numbers as numbers. Empty when the run is unknown."""
    return PreannotationRun(connection, run).state()


def failures(connection: Redis, run: str) -> list[dict[str, Any]]:
    """The run's latest failed tasks, oldest first: ``{"task": id, "reason": sentence}``."""
    return PreannotationRun(connection, run).failures()


def lease_owners(connection: Redis, run: str) -> list[str]:
    """Who holds each of the run's leased chunks right now."""
    return PreannotationRun(connection, run).lease_owners()


def progress_meta(run_state: dict[str, Any]) -> dict[str, Any]:
    """What job meta and ``maskclip jobs`` show of a run."""
    keys = ("run", "phase", "total", "done", "predicted", "failed", "skipped", "tasks_per_second", "version")
    return {k: run_state[k] for k in keys if k in run_state}


def runs(connection: Redis, limit: int = 100) -> list[dict[str, Any]]:
    """Known runs (live and recently finished), newest first."""
    found = []
    for key in connection.scan_iter(match=f"{_PREFIX}*", count=500):
        name = key.decode()[len(_PREFIX) :]
        if ":" not in name:
            found.append(state(connection, name))
    found = [r for r in found if r]
    return sorted(found, key=lambda r: float(r.get("started", 0)), reverse=True)[:limit]


def publish_metrics(connection: Redis, metrics: Any, limit: int = 50) -> None:
    """Set the pre-annotation gauges of ``/metrics`` from the runs Redis knows about."""
    for name in ("total", "done", "failed", "tasks_per_second", "running"):
        metrics.forget(f"maskclip_preannotate_{name}")
    for run in reversed(runs(connection, limit)):  # newest last: it wins for its (project, version)
        labels = {"project": str(run.get("project")), "version": str(run.get("version"))}
        metrics.set("maskclip_preannotate_total", run.get("total", 0), **labels)
        metrics.set("maskclip_preannotate_done", run.get("done", 0), **labels)
        metrics.set("maskclip_preannotate_failed", run.get("failed", 0), **labels)
        metrics.set("maskclip_preannotate_tasks_per_second", run.get("tasks_per_second", 0), **labels)
        live = 0 if run.get("phase") == "done" else 1
        metrics.set("maskclip_preannotate_running", live, phase=str(run.get("phase")), **labels)
