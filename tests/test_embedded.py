"""`maskclip-backend serve`'s embedded Redis and worker: restarted when they die, gone when the server dies."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest
import requests

from tests.label_studio_server import Backend
from tests.test_backend_protocol import document_root, label_studio_stub, predictor, settings  # noqa: F401


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"{what} did not happen within {timeout:.0f} s")


def children(pid: int, marker: str) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if marker in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def queue_state(url: str) -> dict:
    return requests.get(f"{url}/health", timeout=10).json().get("queue", {})


def test_embedded_services_restart_and_die_with_the_server(tiny_vit, tmp_path: Path) -> None:
    env = {
        "MASKCLIP_MODEL": str(tiny_vit.config),
        "MASKCLIP_PRETRAINED": str(tiny_vit.state_dict),
        "MASKCLIP_DEVICE": "cpu",
        "MODEL_DIR": str(tmp_path / "models"),
        "REDIS_URL": "",
        "HF_HUB_OFFLINE": "1",
    }
    server = Backend(env, tmp_path / "backend.log")
    try:
        health = requests.get(f"{server.url}/health", timeout=10).json()
        assert health["status"] == "UP" and health["queue"]["redis"] == "reachable"
        wait_for(lambda: queue_state(server.url).get("workers"), 60, "the embedded worker registering")
        [worker] = children(server.process.pid, "workers.cli")
        [redis] = children(server.process.pid, "redis-server")

        worker.kill()  # a dead worker is noticed and replaced
        wait_for(
            lambda: [p for p in children(server.process.pid, "workers.cli") if p.pid != worker.pid],
            30,
            "a new embedded worker",
        )
        redis.kill()  # so is a dead Redis; meanwhile /health says so and model serving stays UP
        down = requests.get(f"{server.url}/health", timeout=10).json()
        assert down["status"] == "UP"
        wait_for(lambda: queue_state(server.url).get("redis") == "reachable", 30, "Redis coming back")
        assert [p for p in children(server.process.pid, "redis-server") if p.pid != redis.pid]
        wait_for(lambda: queue_state(server.url).get("workers"), 60, "a worker registering again")

        # The server is killed outright: no exit handler runs, yet nothing it started survives it.
        spawned = psutil.Process(server.process.pid).children(recursive=True)
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait()
        gone, alive = psutil.wait_procs(spawned, timeout=30)
        assert alive == [], [p.cmdline() for p in alive]
    finally:
        if server.process.poll() is None:
            server.stop()
        else:  # reap anything left in its session so a failing run does not leak processes
            try:
                os.killpg(server.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_health_reports_an_unreachable_queue_and_stays_up(settings, predictor, tmp_path) -> None:  # noqa: F811
    from dataclasses import replace

    from backend.app import create_app
    from ls_integration.predictor import Predictor

    changed = replace(settings, redis_url=f"unix://{tmp_path}/nobody-listens.sock")
    client = create_app(changed, Predictor(predictor.segmenter, changed)).test_client()
    started = time.perf_counter()
    health = client.get("/health").json
    assert health["status"] == "UP" and health["queue"]["redis"].startswith("unreachable")
    assert time.perf_counter() - started < 3


def test_embedded_queue_under_a_relative_model_dir(monkeypatch, tmp_path) -> None:
    from backend.cli import embedded_worker_command
    from maskclip_service.embedded_queue import EmbeddedQueue

    monkeypatch.chdir(tmp_path)  # MODEL_DIR=models, as the default is
    queue = EmbeddedQueue(Path("models") / ".queue", embedded_worker_command())
    try:
        assert queue.redis.ping() and queue.socket.is_absolute()
    finally:
        queue.stop()
    assert queue.redis_server.poll() is not None and queue.worker.poll() is not None
