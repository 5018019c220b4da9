"""Whole-project pre-annotation runs: their state in Redis, shared by the backend, the CLI and the workers.

A *run* writes predictions of one target version into one project. It is cut
into chunks of tens of tasks; any number of workers take chunks in parallel.

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

A worker refreshes its lease while it works; a lease that expires (the worker
was killed) is taken over by another worker, so a dead worker loses at most
its chunk. Before importing, a worker checks again which tasks already hold the
target version, so rerunning never duplicates a prediction.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from redis import Redis
from rq import Queue

from .job_paths import PREANNOTATION_JOBS

WHOLE_PROJECT = "*"
CURRENT = "current"  # the version key of a run that serves whatever the project's current model is
RUN_TTL_S = 7 * 24 * 3600
_PREFIX = "maskclip:preannotate-run:"

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

PLANNER_TTL_S = 600  # a planner refreshes its lock while it lists tasks; a killed one frees it after this


# Atomically: a run with no chunk left and none leased either plans again (triggers came in) or ends.
_FINISH = """
local state = KEYS[1]
if redis.call('hget', state, 'phase') == 'done' then return 'over' end
if redis.call('llen', state .. ':todo') > 0 or redis.call('hlen', state .. ':leases') > 0 then return 'busy' end
if redis.call('hget', state, 'planning') == '1' then return 'busy' end
if redis.call('llen', state .. ':extra') > 0 then
  redis.call('hset', state, 'planning', '1')
  return 'plan'
end
if redis.call('get', KEYS[2]) == ARGV[1] then redis.call('del', KEYS[2]) end
redis.call('hset', state, 'phase', 'done', 'finished', ARGV[2])
for _, suffix in ipairs({'', ':todo', ':chunks', ':leases', ':extra', ':planned', ':attempts'}) do
  redis.call('expire', state .. suffix, ARGV[3])
end
return 'done'
"""


def live_key(project: int | str, version: str | None) -> str:
    return f"maskclip:preannotate:{project}:{version or CURRENT}"


def state_key(run: str) -> str:
    return f"{_PREFIX}{run}"


def start_run(
    connection: Redis,
    project: int,
    *,
    version: str | None = None,
    task_ids: list[int] | None = None,
    trigger: str = "manual",
    set_project_version: bool = False,
    queue_name: str = "maskclip-training",
    lost_after_s: int = 120,
) -> tuple[str, str]:
    """Queue pre-annotation of ``task_ids`` (or the whole project); returns ``(run id, status)``.

    Status is ``queued`` (a new run), ``coalesced`` (joined the live run of the
    same project and version) or ``resumed`` (the live run had gone silent: its
    workers died; it is queued again and finishes what it had left).
    """
    run = f"pre-p{project}-{uuid.uuid4().hex[:12]}"
    scope = json.dumps(sorted(int(t) for t in task_ids)) if task_ids is not None else WHOLE_PROJECT
    now = time.time()
    live, status = connection.eval(
        _JOIN_OR_CLAIM, 2, live_key(project, version), _PREFIX, run, scope, f"{now:.3f}", lost_after_s
    )
    live, status = live.decode(), status.decode()
    if set_project_version and status != "queued":  # the joined run switches the project at its end too
        connection.hset(state_key(live), "set_project_version", 1)
    if status == "coalesced":
        return live, status
    if status == "queued":
        connection.hset(
            state_key(live),
            mapping={
                "project": project,
                "version": version or CURRENT,
                "version_key": version or CURRENT,
                "trigger": trigger,
                "set_project_version": int(set_project_version),
                "phase": "queued",
                "started": f"{now:.3f}",
                "heartbeat": f"{now:.3f}",
                "planning": 1,
                "total": 0,
                "done": 0,
                "predicted": 0,
                "failed": 0,
                "skipped": 0,
                "chunks": 0,
            },
        )
        connection.rpush(state_key(live) + ":extra", scope)
        connection.expire(state_key(live), RUN_TTL_S)
        enqueue_job(connection, "plan_run", project, live, queue_name)
    elif connection.exists(planner_key(live)):
        return live, "coalesced"  # its planner is alive (it was only queued behind other jobs): it takes the scope
    else:  # resumed: plan again (the planner may have died) and put workers back on what is left
        connection.hset(state_key(live), "planning", 1)
        enqueue_job(connection, "plan_run", project, live, queue_name)
    return live, status


def planner_key(run: str) -> str:
    """Held by the one planner of ``run`` at a time, so two planners never cut chunks of the same tasks."""
    return f"{state_key(run)}:planner"


def enqueue_job(connection: Redis, function: str, project: int, run: str, queue_name: str) -> str:
    """Queue one pre-annotation job (``plan_run`` or ``work_run``) for ``run``; JSON-safe arguments, any worker
    host can take it."""
    job_id = f"{run}-{function.split('_')[0]}-{uuid.uuid4().hex[:6]}"
    Queue(queue_name, connection=connection).enqueue(
        PREANNOTATION_JOBS[function],
        project,
        run,
        job_id=job_id,
        job_timeout=6 * 3600,
        result_ttl=24 * 3600,
        failure_ttl=7 * 24 * 3600,
        meta={"project": project, "run": run, "phase": "queued", "kind": "pre-annotation"},
        description=f"pre-annotate project {project} ({function})",
    )
    return job_id


def state(connection: Redis, run: str) -> dict[str, Any]:
    """The run's fields, decoded; numbers as numbers. Empty when the run is unknown."""
    raw = connection.hgetall(state_key(run))
    out: dict[str, Any] = {}
    for key, value in raw.items():
        key, text = key.decode(), value.decode()
        try:
            out[key] = int(text)
        except ValueError:
            try:
                out[key] = float(text)
            except ValueError:
                out[key] = text
    if out:
        out["run"] = run
        end = float(out.get("finished") or time.time())
        elapsed = max(end - float(out.get("started", end)), 1e-6)
        out["tasks_per_second"] = round(out.get("done", 0) / elapsed, 3)
    return out


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


def nothing_left(connection: Redis, run: str) -> bool:
    """No chunk waits or is leased, no planner is at work and no trigger waits: the run is about to end."""
    key = state_key(run)
    with connection.pipeline() as pipe:
        pipe.llen(key + ":todo")
        pipe.hlen(key + ":leases")
        pipe.llen(key + ":extra")
        pipe.hget(key, "planning")
        todo, leased, extra, planning = pipe.execute()
    return not todo and not leased and not extra and planning != b"1"


def try_finish(connection: Redis, run: str, project: int | str, version_key: str) -> str:
    """``done`` (the run ended now and its key is free), ``plan`` (triggers came in: plan again), ``busy``
    (chunks are left or leased) or ``over`` (it had ended already)."""
    result = connection.eval(
        _FINISH, 2, state_key(run), live_key(project, version_key), run, f"{time.time():.3f}", 24 * 3600
    )
    return result.decode()


def abandon(connection: Redis, run: str, project: int | str, reason: str) -> None:
    """End ``run`` without finishing it: its phase says why, and its (project, version) key is free again."""
    version_key = (connection.hget(state_key(run), "version_key") or CURRENT.encode()).decode()
    connection.eval(
        "if redis.call('get', KEYS[1]) == ARGV[1] then redis.call('del', KEYS[1]) end return 0",
        1,
        live_key(project, version_key),
        run,
    )
    connection.hset(state_key(run), mapping={"phase": "done", "error": reason, "finished": f"{time.time():.3f}"})


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
