"""Pre-annotation jobs: write a model's proposals into a whole project through Label Studio's bulk import.

``plan_run`` lists the tasks a run has to consider and cuts them into chunks;
``work_run`` jobs (as many as there are chunks, up to a cap) take chunks until
none are left, on whichever workers are free. Run state lives in Redis
(:mod:`maskclip_service.preannotation_runs`, :mod:`maskclip_service.chunk_leases`): a killed worker
loses at most two chunks (one being predicted, one being imported), which other workers take over once
their leases expire.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from label_studio_sdk import LabelStudio
from redis import Redis
from rq import get_current_job

from ls_integration.auth import LabelStudioAuth
from ls_integration.connection import label_studio_target
from ls_integration.fetching import ImageFetcher
from ls_integration.label_config import ProjectSchema, parse_label_config
from ls_integration.predictor import Predictor
from maskclip_service import chunk_leases
from maskclip_service import preannotation_runs as runs
from maskclip_service.errors import PreannotationError
from maskclip_service.redis_connection import connect
from maskclip_service.settings import Settings

from .context import shared_segmenter

log = logging.getLogger(__name__)

MAX_WORK_JOBS = 32  # work jobs queued per planning round; each takes chunks until none are left
MAX_ATTEMPTS = 3  # a chunk that fails this often (Label Studio refusing the import, say) is given up
_LIST_PAGE = 100

_predictors: dict[tuple[int, int], Predictor] = {}
_predictors_lock = threading.Lock()


def _predictor(settings: Settings) -> Predictor:
    """One Predictor per worker process around the shared model (its fetch pool and student cache are kept)."""
    segmenter = shared_segmenter(settings)
    with _predictors_lock:
        key = (id(segmenter.clip), id(segmenter.features))  # the shared model and feature store
        predictor = _predictors.get(key)
        if predictor is None:
            # No annotator clicks on a worker's images: keeping their dense state for smart tools would only
            # hold memory. Their features still go to the feature store, for the backend's first click.
            without_cache = dataclasses.replace(settings, feature_cache_mb=0)
            predictor = _predictors[key] = Predictor(segmenter, without_cache)
        return predictor


@dataclass
class RunContext:
    connection: Redis
    project: int
    run: str
    settings: Settings
    predictor: Predictor
    client: LabelStudio
    fetcher: ImageFetcher
    schema: ProjectSchema


def _context(project: int, run: str) -> RunContext:
    settings = Settings.from_env()
    job = get_current_job()
    connection = job.connection if job is not None else connect(settings.redis_url or "")
    state = runs.state(connection, run)
    if not state:
        raise PreannotationError(f"pre-annotation run {run} is unknown (expired or never queued).")
    predictor = _predictor(settings)
    target = label_studio_target(settings, project, predictor.projects)
    if target is None:
        raise PreannotationError(
            "the worker does not know where Label Studio is: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY, "
            "or connect the model to the project in Label Studio first."
        )
    auth = LabelStudioAuth(*target)
    client = LabelStudio(base_url=auth.url, api_key=target[1])
    config = client.projects.get(id=project).label_config
    schema = parse_label_config(config, settings.max_labels)
    return RunContext(connection, project, run, settings, predictor, client, ImageFetcher(settings, auth), schema)


def _update_job(state: dict[str, Any]) -> None:
    job = get_current_job()
    if job is not None:
        job.meta.update(runs.progress_meta(state), heartbeat=time.time())
        job.save_meta()


# ------------------------------------------------------------------ planning
def plan_run(project: int, run: str) -> dict[str, Any]:
    """List what the run has to consider, skip what is done, and queue the chunks for the workers."""
    ctx = _context(project, run)
    key = runs.state_key(run)
    token = uuid.uuid4().hex
    if not ctx.connection.set(runs.planner_key(run), token, nx=True, ex=runs.PLANNER_TTL_S):
        log.info("project %s: run %s already has a planner at work; it takes the new scopes", project, run)
        return runs.progress_meta(runs.state(ctx.connection, run))
    try:
        return _plan(ctx, project, run, key)
    except PreannotationError as exc:  # the run cannot go on (unknown version): end it, so triggers start anew
        runs.abandon(ctx.connection, run, project, str(exc))
        raise
    finally:
        ctx.connection.eval(_RELEASE_IF_OURS, 1, runs.planner_key(run), token)


_RELEASE_IF_OURS = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


def _beat(ctx: RunContext) -> None:
    """The run's heartbeat, and the planner's lock kept while it works."""
    ctx.connection.hset(runs.state_key(ctx.run), "heartbeat", time.time())
    ctx.connection.expire(runs.planner_key(ctx.run), runs.PLANNER_TTL_S)


def _plan(ctx: RunContext, project: int, run: str, key: str) -> dict[str, Any]:
    state = runs.state(ctx.connection, run)
    version = state.get("version")
    if version == runs.CURRENT or not version:
        version = ctx.predictor.project_version(str(project), ctx.schema)
    elif (
        version != ctx.predictor.maskclip_version(ctx.schema)
        and ctx.predictor.registry.find(str(project), version) is None
    ):
        raise PreannotationError(
            f"version {version!r} is neither MaskCLIP's for this project's labels "
            f"({ctx.predictor.maskclip_version(ctx.schema)}) nor a student of project {project}."
        )
    ctx.connection.hset(key, mapping={"version": version, "phase": "listing tasks", "heartbeat": time.time()})
    while True:
        scopes = [s.decode() for s in ctx.connection.lrange(key + ":extra", 0, -1)]
        chunks = _plan_scopes(ctx, version, scopes)
        ctx.connection.ltrim(key + ":extra", len(scopes), -1)
        ctx.connection.hset(key, mapping={"planning": 0, "phase": "predicting", "heartbeat": time.time()})
        waiting = ctx.connection.llen(key + ":todo") + ctx.connection.hlen(key + ":leases")
        for _ in range(min(max(chunks, 1 if waiting else 0), MAX_WORK_JOBS)):
            runs.enqueue_job(ctx.connection, "work_run", project, run, ctx.settings.queue_name)
        outcome = _try_finish(ctx)
        if outcome != "plan":
            break
    state = runs.state(ctx.connection, run)
    _update_job(state)
    log.info("project %s: run %s planned %s tasks for %s", project, run, state.get("total"), version)
    return runs.progress_meta(state)


def _plan_scopes(ctx: RunContext, version: str, scopes: list[str]) -> int:
    """Turn trigger scopes into chunks of tasks; returns how many chunks were queued."""
    key = runs.state_key(ctx.run)
    whole = runs.WHOLE_PROJECT in scopes
    wanted: set[int] = set()
    for scope in scopes:
        if scope != runs.WHOLE_PROJECT:
            wanted.update(int(t) for t in json.loads(scope))
    skip_annotated = ctx.settings.preannotate_skip_annotated
    holding = _holding(ctx, version, None if whole else sorted(wanted))
    chunk: list[dict] = []
    made = considered = skipped = 0

    def flush() -> None:
        nonlocal made, chunk
        if not chunk:
            return
        number = int(ctx.connection.hincrby(key, "chunks", 1))
        with ctx.connection.pipeline() as pipe:
            pipe.hset(key + ":chunks", number, json.dumps(chunk))
            pipe.sadd(key + ":planned", *[t["id"] for t in chunk])
            pipe.rpush(key + ":todo", number)
            pipe.execute()
        _beat(ctx)
        made += 1
        chunk = []

    for task in _tasks(ctx, None if whole else sorted(wanted)):
        if ctx.connection.sismember(key + ":planned", task["id"]):
            continue
        considered += 1
        if task["id"] in holding or (skip_annotated and task["annotated"]):
            skipped += 1
            continue
        chunk.append({"id": task["id"], "data": task["data"]})
        if len(chunk) >= ctx.settings.preannotate_chunk:
            flush()
    flush()
    with ctx.connection.pipeline() as pipe:
        pipe.hincrby(key, "total", considered)
        pipe.hincrby(key, "done", skipped)
        pipe.hincrby(key, "skipped", skipped)
        pipe.execute()
    return made


def _tasks(ctx: RunContext, ids: list[int] | None):
    """``{"id", "data", "annotated"}`` for the project's tasks (or just ``ids``), page by page.

    Listed without their predictions: Label Studio would send every earlier proposal's RLE along
    (:func:`_holding` says which tasks hold a version).
    """
    seen = 0
    for task in _listing(ctx, ids, "task_only"):
        seen += 1
        if seen % _LIST_PAGE == 0:
            _beat(ctx)
        yield {"id": task.id, "data": task.data, "annotated": bool(task.total_annotations)}


def _listing(ctx: RunContext, ids: list[int] | None, fields: str, filters: dict | None = None):
    """The project's tasks (or just ``ids``, a few hundred per listing) in Label Studio's Data Manager."""
    scopes = [None] if ids is None else [ids[i : i + 500] for i in range(0, len(ids), 500)]
    for scope in scopes:
        query: dict[str, Any] = {}
        if scope is not None:
            query["selectedItems"] = {"all": False, "included": scope}
        if filters is not None:
            query["filters"] = filters
        yield from ctx.client.tasks.list(
            project=ctx.project, fields=fields, page_size=_LIST_PAGE, **({"query": json.dumps(query)} if query else {})
        )


def _holding(ctx: RunContext, version: str, ids: list[int] | None) -> set[int]:
    """The tasks (of ``ids``, or of the whole project) that hold a prediction of exactly ``version``.

    Label Studio's filter on prediction versions (the Data Manager's own, a list of versions) lists the tasks
    without their predictions, but matches substrings ("...-v1" also finds "...-v10"): only the tasks it finds
    are listed again with their predictions and compared exactly.
    """
    versions = {"filter": "filter:tasks:predictions_model_versions", "operator": "contains", "type": "List"}
    filters = {"conjunction": "and", "items": [{**versions, "value": [version]}]}
    candidates = [task.id for task in _listing(ctx, ids, "task_only", filters)]
    if not candidates:
        return set()
    return {
        task.id
        for task in _listing(ctx, candidates, "all")
        if version in {_field(p, "model_version") for p in task.predictions or []}
    }


def _field(item: Any, name: str) -> Any:
    return item.get(name) if isinstance(item, dict) else getattr(item, name, None)


# ------------------------------------------------------------------ working
def work_run(project: int, run: str) -> dict[str, Any]:
    """Take chunks of the run until none are left; predict, check, import each one.

    A chunk's import runs in the background while the next chunk is predicted (at most one import in
    flight), so the worker's device and Label Studio's import work at the same time; the check for tasks
    that already hold the version still comes right before each import.
    """
    ctx = _context(project, run)
    job = get_current_job()
    owner = job.id if job is not None else f"local-{uuid.uuid4().hex[:8]}"
    lease_s = ctx.settings.preannotate_lease_s
    key = runs.state_key(run)
    waited_since = None
    importing: tuple[str, Future] | None = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-import") as imports:
        while True:
            chunk = chunk_leases.claim(ctx.connection, run, owner, lease_s)
            if chunk is None:
                if importing is not None:  # ours first: a failed import gives its chunk back to the queue
                    _settle(ctx, importing, owner)
                    importing = None
                    continue
                # Nothing to take; a chunk leased by another worker may still come back if that worker died.
                if ctx.connection.hlen(key + ":leases") == 0:
                    break
                waited_since = waited_since or time.monotonic()
                if time.monotonic() - waited_since > lease_s + 5:
                    break
                time.sleep(min(1.0, lease_s / 4))
                continue
            waited_since = None
            try:
                predicted = _predict_chunk(ctx, chunk, owner)
            except Exception:  # Label Studio or Redis failed mid-chunk: another attempt, here or elsewhere
                log.exception("run %s: chunk %s failed", run, chunk)
                _give_back(ctx, chunk, owner)
                continue
            if importing is not None:
                _settle(ctx, importing, owner)
            importing = (chunk, imports.submit(_import_chunk, ctx, predicted, owner))
    outcome = _try_finish(ctx)
    if outcome == "plan":
        runs.enqueue_job(ctx.connection, "plan_run", project, run, ctx.settings.queue_name)
    state = runs.state(ctx.connection, run)
    _update_job(state)
    return runs.progress_meta(state)


@dataclass
class _Predicted:
    """A chunk's predictions, waiting for their import; ``stop`` ends the chunk's lease heartbeat."""

    chunk: str
    tasks: list[dict]
    version: str
    predictions: list[dict | None]
    stop: threading.Event


def _predict_chunk(ctx: RunContext, chunk: str, owner: str) -> _Predicted:
    """Predict a leased chunk's tasks; its lease is renewed from now until its import ends."""
    key = runs.state_key(ctx.run)
    lease_s = ctx.settings.preannotate_lease_s
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(max(lease_s / 4, 0.5)):
            chunk_leases.renew(ctx.connection, ctx.run, chunk, owner, lease_s)
            ctx.connection.hset(key, "heartbeat", time.time())

    threading.Thread(target=beat, name="chunk-lease", daemon=True).start()
    try:
        tasks = json.loads(ctx.connection.hget(key + ":chunks", chunk) or b"[]")
        version = runs.state(ctx.connection, ctx.run)["version"]
        predictions = list(
            ctx.predictor.predict_tasks(tasks, ctx.schema, str(ctx.project), requested=version, fetcher=ctx.fetcher)
        )
    except BaseException:
        stop.set()
        raise
    return _Predicted(chunk, tasks, version, predictions, stop)


def _import_chunk(ctx: RunContext, predicted: _Predicted, owner: str) -> None:
    """Import a chunk's predictions of the run's version that no task holds yet, count them, free the lease."""
    key = runs.state_key(ctx.run)
    chunk, tasks, version, predictions = predicted.chunk, predicted.tasks, predicted.version, predicted.predictions
    try:
        # Only the run's version is imported: a prediction from another model (a student whose labels no longer
        # match falls back to MaskCLIP) would be imported again by every rerun, which checks for this version.
        for task, prediction in zip(tasks, predictions):
            if prediction is not None and prediction["model_version"] != version:
                log.warning(
                    "task %s: predicted by %s, not %s; not imported", task["id"], prediction["model_version"], version
                )
        failed = [t["id"] for t, p in zip(tasks, predictions) if p is None or p["model_version"] != version]
        ready = {t["id"]: p for t, p in zip(tasks, predictions) if p is not None and p["model_version"] == version}
        # Checked right before the import: another worker (or run) may have written the version meanwhile.
        done_already = _holding(ctx, version, list(ready)) if ready else set()
        entries = [
            {"task": t, "result": p["result"], "score": p["score"], "model_version": p["model_version"]}
            for t, p in ready.items()
            if t not in done_already
        ]
        if not chunk_leases.renew(ctx.connection, ctx.run, chunk, owner, ctx.settings.preannotate_lease_s):
            log.warning("run %s: chunk %s was taken over by another worker; dropping this attempt", ctx.run, chunk)
            return
        if entries:
            ctx.client.projects.import_predictions(id=ctx.project, request=entries)
        if failed:
            log.warning("run %s: tasks %s got no prediction (image failed); a later run retries them", ctx.run, failed)
        with ctx.connection.pipeline() as pipe:
            pipe.hincrby(key, "done", len(tasks))
            pipe.hincrby(key, "predicted", len(entries))
            pipe.hincrby(key, "failed", len(failed))
            pipe.hincrby(key, "skipped", len(done_already))
            pipe.hset(key, "heartbeat", time.time())
            pipe.execute()
    finally:
        predicted.stop.set()
    chunk_leases.renew(ctx.connection, ctx.run, chunk, owner, None)


def _settle(ctx: RunContext, importing: tuple[str, Future], owner: str) -> None:
    """Wait for a chunk's import; a failed one goes back to the queue (another attempt, here or elsewhere)."""
    chunk, future = importing
    try:
        future.result()
    except Exception:  # Label Studio or Redis failed mid-import
        log.exception("run %s: chunk %s failed", ctx.run, chunk)
        _give_back(ctx, chunk, owner)
    _update_job(runs.state(ctx.connection, ctx.run))


def _give_back(ctx: RunContext, chunk: str, owner: str) -> None:
    """Return a failed chunk to the queue; after ``MAX_ATTEMPTS`` its tasks count as failed (a later run retries)."""
    key = runs.state_key(ctx.run)
    attempts = int(ctx.connection.hincrby(key + ":attempts", chunk, 1))
    if not chunk_leases.renew(ctx.connection, ctx.run, chunk, owner, None):
        return  # another worker has it already
    if attempts < MAX_ATTEMPTS:
        ctx.connection.rpush(key + ":todo", chunk)
        return
    tasks = json.loads(ctx.connection.hget(key + ":chunks", chunk) or b"[]")
    log.error(
        "run %s: chunk %s failed %d times; its %d tasks are left for a later run", ctx.run, chunk, attempts, len(tasks)
    )
    with ctx.connection.pipeline() as pipe:
        pipe.hincrby(key, "done", len(tasks))
        pipe.hincrby(key, "failed", len(tasks))
        pipe.execute()


def _try_finish(ctx: RunContext) -> str:
    """End the run if nothing is left (see ``runs.try_finish``); a run that switches the project's version does so
    first, so a run reads as done only once annotators see its proposals. Setting the version twice (two workers
    finding nothing left) is harmless; a failure to set it leaves the run open for a retry."""
    state = runs.state(ctx.connection, ctx.run)
    if state.get("set_project_version") and runs.nothing_left(ctx.connection, ctx.run):
        # Label Studio shows annotators the predictions whose model_version equals the project's.
        ctx.client.projects.update(id=ctx.project, model_version=state["version"])
    outcome = runs.try_finish(ctx.connection, ctx.run, ctx.project, state.get("version_key", runs.CURRENT))
    if outcome == "done":
        log.info(
            "project %s: pre-annotation run %s done: %s",
            ctx.project,
            ctx.run,
            runs.progress_meta(runs.state(ctx.connection, ctx.run)),
        )
    return outcome
