"""Pre-annotation jobs: write a model's proposals into a whole project through Label Studio's bulk import.

``plan_run`` lists the tasks a run has to consider and cuts them into chunks;
``work_run`` jobs (as many as there are chunks, up to a cap) take chunks until
none are left, on whichever workers are free. Run state lives in Redis
(:class:`maskclip_service.preannotation_runs.PreannotationRun` owns its keys): a killed worker
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
from label_studio_sdk.core.api_error import ApiError
from redis.exceptions import RedisError
from rq import get_current_job

from ls_integration.auth import LabelStudioAuth
from ls_integration.connection import label_studio_target
from ls_integration.errors import ImageFetchError
from ls_integration.fetching import ImageFetcher
from ls_integration.label_config import ProjectSchema, parse_label_config
from ls_integration.predictor import Predictor
from maskclip_service import preannotation_runs as runs
from maskclip_service.defaults import MAX_WORK_JOBS, TASK_PAGE, TASKS_PER_LISTING
from maskclip_service.errors import PreannotationError
from maskclip_service.preannotation_runs import PreannotationRun
from maskclip_service.redis_connection import connect
from maskclip_service.settings import Settings

from .context import shared_segmenter

log = logging.getLogger(__name__)

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


class _ReasonsFetcher(ImageFetcher):
    """An :class:`ImageFetcher` that remembers why each task's image failed, so the run can say why a task got
    no prediction (the predictor itself only logs it)."""

    def __init__(self, settings: Settings, auth: LabelStudioAuth | None) -> None:
        super().__init__(settings, auth)
        self._reasons: dict[object, str] = {}
        self._lock = threading.Lock()  # the predictor fetches on a thread pool

    def fetch(self, reference: object, task_id: object = None) -> Any:
        try:
            return super().fetch(reference, task_id)
        except ImageFetchError as exc:
            with self._lock:
                self._reasons[task_id] = str(exc)
            raise

    def reason(self, task_id: object) -> str:
        """Why ``task_id``'s image failed (and forget it); a general sentence when the fetch did not fail."""
        with self._lock:
            found = self._reasons.pop(task_id, None)
        return found or "no prediction: the task's image could not be read (the worker's log says why)"


@dataclass(frozen=True)
class RunContext:
    """What a plan or work job needs about its run; ``run`` owns the run's keys in Redis."""

    run: PreannotationRun
    project: int
    settings: Settings
    predictor: Predictor
    client: LabelStudio
    fetcher: _ReasonsFetcher
    schema: ProjectSchema


def _context(project: int, run_id: str) -> RunContext:
    settings = Settings.from_env()
    job = get_current_job()
    connection = job.connection if job is not None else connect(settings.redis_url or "")
    run = PreannotationRun(connection, run_id)
    if not run.exists():
        raise PreannotationError(f"pre-annotation run {run_id} is unknown (expired or never queued).")
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
    return RunContext(run, project, settings, predictor, client, _ReasonsFetcher(settings, auth), schema)


def _update_job(run: PreannotationRun) -> dict[str, Any]:
    """The run's progress into the current job's meta; returns it."""
    progress = run.progress()
    job = get_current_job()
    if job is not None:
        job.meta.update(progress, heartbeat=time.time())
        job.save_meta()
    return progress


# ------------------------------------------------------------------ planning
def plan_run(project: int, run: str) -> dict[str, Any]:
    """List what the run has to consider, skip what is done, and queue the chunks for the workers."""
    ctx = _context(project, run)
    token = ctx.run.take_planner()
    if token is None:
        log.info("project %s: run %s already has a planner at work; it takes the new scopes", project, run)
        return ctx.run.progress()
    try:
        return _plan(ctx)
    except PreannotationError as exc:  # the run cannot go on (unknown version): end it, so triggers start anew
        ctx.run.abandon(str(exc))
        raise
    finally:
        ctx.run.release_planner(token)


def _target_version(ctx: RunContext) -> str:
    """The version the run writes: the project's current model, or the one it names if that exists."""
    version = ctx.run.version()
    if version == runs.CURRENT or not version:
        return ctx.predictor.project_version(str(ctx.project), ctx.schema)
    maskclip = ctx.predictor.maskclip_version(ctx.schema)
    if version != maskclip and ctx.predictor.registry.find(str(ctx.project), version) is None:
        raise PreannotationError(
            f"version {version!r} is neither MaskCLIP's for this project's labels "
            f"({maskclip}) nor a student of project {ctx.project}."
        )
    return version


def _plan(ctx: RunContext) -> dict[str, Any]:
    version = _target_version(ctx)
    ctx.run.begin_listing(version)
    while True:
        scopes = ctx.run.scopes()
        chunks = _plan_scopes(ctx, version, scopes)
        ctx.run.drop_scopes(len(scopes))
        waiting = ctx.run.planned()
        for _ in range(min(max(chunks, 1 if waiting else 0), MAX_WORK_JOBS)):
            ctx.run.queue_job("work_run", ctx.settings.queue_name, ctx.project)
        if _try_finish(ctx) != "plan":
            break
    progress = _update_job(ctx.run)
    log.info("project %s: run %s planned %s tasks for %s", ctx.project, ctx.run.id, progress.get("total"), version)
    return progress


def _plan_scopes(ctx: RunContext, version: str, scopes: list[str]) -> int:
    """Turn trigger scopes into chunks of tasks; returns how many chunks were queued."""
    whole = runs.WHOLE_PROJECT in scopes
    wanted: set[int] = set()
    for scope in scopes:
        if scope != runs.WHOLE_PROJECT:
            wanted.update(int(t) for t in json.loads(scope))
    skip_annotated = ctx.settings.preannotate_skip_annotated
    holding = _holding(ctx, version, None if whole else sorted(wanted))
    chunk: list[dict] = []
    made = considered = skipped = 0
    for task in _tasks(ctx, None if whole else sorted(wanted)):
        if ctx.run.is_planned(task["id"]):
            continue
        considered += 1
        if task["id"] in holding or (skip_annotated and task["annotated"]):
            skipped += 1
            continue
        chunk.append({"id": task["id"], "data": task["data"]})
        if len(chunk) >= ctx.settings.preannotate_chunk:
            made += _flush(ctx, chunk)
            chunk = []
    made += _flush(ctx, chunk)
    ctx.run.count_listed(considered, skipped)
    return made


def _flush(ctx: RunContext, chunk: list[dict]) -> int:
    """Queue ``chunk`` (if it has tasks) for the workers; returns how many chunks that made (0 or 1)."""
    if not chunk:
        return 0
    ctx.run.add_chunk(chunk)
    ctx.run.heartbeat(planner=True)
    return 1


def _tasks(ctx: RunContext, ids: list[int] | None):
    """``{"id", "data", "annotated"}`` for the project's tasks (or just ``ids``), page by page.

    Listed without their predictions: Label Studio would send every earlier proposal's RLE along
    (:func:`_holding` says which tasks hold a version).
    """
    seen = 0
    for task in _listing(ctx, ids, "task_only"):
        seen += 1
        if seen % TASK_PAGE == 0:
            ctx.run.heartbeat(planner=True)
        yield {"id": task.id, "data": task.data, "annotated": bool(task.total_annotations)}


def _listing(ctx: RunContext, ids: list[int] | None, fields: str, filters: dict | None = None):
    """The project's tasks (or just ``ids``, a few hundred per listing) in Label Studio's Data Manager."""
    step = TASKS_PER_LISTING
    scopes = [None] if ids is None else [ids[i : i + step] for i in range(0, len(ids), step)]
    for scope in scopes:
        query: dict[str, Any] = {}
        if scope is not None:
            query["selectedItems"] = {"all": False, "included": scope}
        if filters is not None:
            query["filters"] = filters
        yield from ctx.client.tasks.list(
            project=ctx.project, fields=fields, page_size=TASK_PAGE, **({"query": json.dumps(query)} if query else {})
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
    waited_since = None
    importing: tuple[str, Future] | None = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-import") as imports:
        while True:
            chunk = ctx.run.claim(owner, lease_s)
            if chunk is None:
                if importing is not None:  # ours first: a failed import gives its chunk back to the queue
                    _settle(ctx, importing, owner)
                    importing = None
                    continue
                # Nothing to take; a chunk leased by another worker may still come back if that worker died.
                if ctx.run.leased() == 0:
                    break
                waited_since = waited_since or time.monotonic()
                if time.monotonic() - waited_since > lease_s + 5:
                    break
                time.sleep(min(1.0, lease_s / 4))
                continue
            waited_since = None
            try:
                predicted = _predict_chunk(ctx, chunk, owner)
            except Exception as exc:  # Label Studio or Redis failed mid-chunk: another attempt, here or elsewhere
                log.exception("run %s: chunk %s failed", run, chunk)
                _give_back(ctx, chunk, owner, failure_reason(exc, "prediction"))
                continue
            if importing is not None:
                _settle(ctx, importing, owner)
            importing = (chunk, imports.submit(_import_chunk, ctx, predicted, owner))
    if _try_finish(ctx) == "plan":
        ctx.run.queue_job("plan_run", ctx.settings.queue_name, project)
    return _update_job(ctx.run)


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
    lease_s = ctx.settings.preannotate_lease_s
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(max(lease_s / 4, 0.5)):
            ctx.run.renew(chunk, owner, lease_s)
            ctx.run.heartbeat()

    threading.Thread(target=beat, name="chunk-lease", daemon=True).start()
    try:
        tasks = ctx.run.chunk_tasks(chunk)
        version = ctx.run.version()
        predictions = list(
            ctx.predictor.predict_tasks(tasks, ctx.schema, str(ctx.project), requested=version, fetcher=ctx.fetcher)
        )
    except BaseException:
        stop.set()
        raise
    return _Predicted(chunk, tasks, version, predictions, stop)


def _unimportable(ctx: RunContext, predicted: _Predicted) -> list[tuple[int, str]]:
    """``(task, reason)`` for each task of the chunk that has no prediction of the run's version to import.

    Only the run's version is imported: a prediction from another model (a student whose labels no longer
    match falls back to MaskCLIP) would be imported again by every rerun, which checks for this version.
    """
    failed = []
    for task, prediction in zip(predicted.tasks, predicted.predictions):
        if prediction is None:
            failed.append((task["id"], ctx.fetcher.reason(task["id"])))
        elif prediction["model_version"] != predicted.version:
            log.warning(
                "task %s: predicted by %s, not %s; not imported",
                task["id"],
                prediction["model_version"],
                predicted.version,
            )
            failed.append(
                (
                    task["id"],
                    f"predicted by {prediction['model_version']}, not {predicted.version}: that model no "
                    "longer serves the project's labels",
                )
            )
    return failed


def _import_chunk(ctx: RunContext, predicted: _Predicted, owner: str) -> None:
    """Import a chunk's predictions of the run's version that no task holds yet, count them, free the lease."""
    chunk, tasks, version = predicted.chunk, predicted.tasks, predicted.version
    try:
        failed = _unimportable(ctx, predicted)
        ready = {
            t["id"]: p for t, p in zip(tasks, predicted.predictions) if p is not None and p["model_version"] == version
        }
        # Checked right before the import: another worker (or run) may have written the version meanwhile.
        done_already = _holding(ctx, version, list(ready)) if ready else set()
        entries = [
            {"task": t, "result": p["result"], "score": p["score"], "model_version": p["model_version"]}
            for t, p in ready.items()
            if t not in done_already
        ]
        if not ctx.run.renew(chunk, owner, ctx.settings.preannotate_lease_s):
            log.warning("run %s: chunk %s was taken over by another worker; dropping this attempt", ctx.run.id, chunk)
            return
        if entries:
            ctx.client.projects.import_predictions(id=ctx.project, request=entries)
        if failed:
            log.warning(
                "run %s: tasks %s got no prediction; a later run retries them", ctx.run.id, [t for t, _ in failed]
            )
        ctx.run.record_chunk(tasks=len(tasks), predicted=len(entries), skipped=len(done_already), failed=failed)
    finally:
        predicted.stop.set()
    ctx.run.release(chunk, owner)


def _settle(ctx: RunContext, importing: tuple[str, Future], owner: str) -> None:
    """Wait for a chunk's import; a failed one goes back to the queue (another attempt, here or elsewhere)."""
    chunk, future = importing
    try:
        future.result()
    except Exception as exc:  # Label Studio or Redis failed mid-import
        log.exception("run %s: chunk %s failed", ctx.run.id, chunk)
        _give_back(ctx, chunk, owner, failure_reason(exc, "import"))
    _update_job(ctx.run)


def _give_back(ctx: RunContext, chunk: str, owner: str, reason: str) -> None:
    """Return a failed chunk to the queue; after ``MAX_ATTEMPTS`` its tasks count as failed (a later run retries)."""
    if ctx.run.give_back(chunk, owner, reason) == "given up":
        log.error(
            "run %s: chunk %s failed too often (%s); its tasks are left for a later run", ctx.run.id, chunk, reason
        )


def failure_reason(exc: BaseException, stage: str) -> str:
    """A short sentence for a failed chunk's tasks, e.g. "Label Studio refused the import (HTTP 400): ..."."""
    status = getattr(exc, "status_code", None)
    if isinstance(exc, ApiError) or status is not None:
        body = getattr(exc, "body", None)
        detail = f": {body}" if body else ""
        return f"Label Studio refused the {stage} (HTTP {status}){detail}"
    if isinstance(exc, RedisError):
        return f"the {stage} failed: Redis was unreachable ({exc.__class__.__name__})"
    return f"the {stage} failed: {exc.__class__.__name__}: {exc}"


def _show_version(ctx: RunContext, version: str) -> None:
    """Make the project show ``version``: Label Studio shows annotators the predictions whose model_version
    equals the project's.

    Label Studio takes only a version that some task holds a prediction of (or an ML backend's title). A run
    that predicted nothing (a promotion in a project whose tasks are all annotated, say) leaves the switch
    pending, and the first run of that version to finish after a task holds one (tasks imported later) makes it.
    """
    try:
        ctx.client.projects.update(id=ctx.project, model_version=version)
    except ApiError as exc:
        if exc.status_code == 400 and "model_version" in json.dumps(exc.body, default=str):
            runs.defer_project_version(ctx.run.connection, ctx.project, version)
            log.info(
                "project %s: no task holds a prediction of %s yet; the project shows it once a run imports one",
                ctx.project,
                version,
            )
            return
        raise
    runs.clear_pending_project_version(ctx.run.connection, ctx.project)


def _try_finish(ctx: RunContext) -> str:
    """End the run if nothing is left (see :meth:`PreannotationRun.try_finish`); a run that switches the project's
    version does so first, so a run reads as done only once annotators see its proposals. Setting the version
    twice (two workers finding nothing left) is harmless; a failure to set it leaves the run open for a retry."""
    state = ctx.run.state()
    version = state.get("version")
    waiting = runs.pending_project_version(ctx.run.connection, ctx.project) == version
    if (state.get("set_project_version") or waiting) and ctx.run.nothing_left():
        _show_version(ctx, version)
    outcome = ctx.run.try_finish()
    if outcome == "done":
        log.info("project %s: pre-annotation run %s done: %s", ctx.project, ctx.run.id, ctx.run.progress())
    return outcome
