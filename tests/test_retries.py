"""Transient network errors are retried (urllib3's Retry); a Label Studio that goes away ends a job cleanly."""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import replace

import pytest
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from ls_integration.auth import LabelStudioAuth
from ls_integration.errors import ImageFetchError, ImageHostUnreachableError
from ls_integration.fetching import ImageFetcher
from maskclip_engine.students.registry import ModelRegistry
from maskclip_service.settings import Settings
from tests.conftest import scene
from tests.label_studio_server import brush_config, brush_results
from tests.scenes import CLASSES, make_scene
from tests.test_backend_protocol import png_bytes

PNG = png_bytes(scene(40, 60))


class StandIn:
    """Label Studio's project, export and upload routes on 127.0.0.1, with faults on demand.

    ``failures[path] = n``: the first n requests for ``path`` get 503. ``stop_after_images``:
    after that many images the server stops listening, as a Label Studio that went down.
    """

    def __init__(self, project: int = 1, images: int = 0, annotated: int = 0) -> None:
        self.files: dict[str, bytes] = {}
        self.failures: dict[str, int] = {}
        self.seen: list[str] = []
        self.stop_after_images: int | None = None
        self._images_served = 0
        tasks = []
        for i in range(images):
            image, labels = make_scene(500 + i)
            self.files[f"/data/upload/{i}.png"] = png_bytes(image)
            annotations = [{"id": i, "result": brush_results(labels, CLASSES)}] if i < annotated else []
            tasks.append({"id": i + 1, "data": {"image": f"/data/upload/{i}.png"}, "annotations": annotations})
        self.files[f"/api/projects/{project}"] = json.dumps({"id": project, "label_config": brush_config(CLASSES)})
        self.files[f"/api/projects/{project}/export"] = json.dumps(tasks).encode()
        self.server = make_server("127.0.0.1", 0, self._app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _app(self, environ, start_response):
        request = Request(environ)
        self.seen.append(request.path)
        if self.failures.get(request.path, 0) > 0:
            self.failures[request.path] -= 1
            return Response("busy", status=503)(environ, start_response)
        body = self.files.get(request.path)
        if body is None:
            return Response("not found", status=404)(environ, start_response)
        if request.path.startswith("/data/upload/"):
            self._images_served += 1
            if self.stop_after_images is not None and self._images_served >= self.stop_after_images:
                threading.Thread(target=self.stop, daemon=True).start()
        return Response(body, mimetype="application/octet-stream")(environ, start_response)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()  # connections are refused from now on


@pytest.fixture
def stand_in():
    server = StandIn()
    yield server
    server.stop()


def fetcher_for(url: str, retries: int = 3) -> ImageFetcher:
    settings = Settings(label_studio_url=url, label_studio_api_key="token", fetch_retries=retries, fetch_timeout=5)
    return ImageFetcher(settings, LabelStudioAuth(url, "token"))


def test_a_fetch_that_fails_twice_then_succeeds(stand_in) -> None:
    stand_in.files["/data/upload/flaky.png"] = PNG
    stand_in.failures["/data/upload/flaky.png"] = 2
    image = fetcher_for(stand_in.url).fetch("/data/upload/flaky.png")
    assert image.shape == (40, 60, 3)
    assert stand_in.seen.count("/data/upload/flaky.png") == 3


def test_retries_are_bounded_and_other_errors_are_not_retried(stand_in) -> None:
    stand_in.files["/data/upload/down.png"] = PNG
    stand_in.failures["/data/upload/down.png"] = 100
    started = time.perf_counter()
    with pytest.raises(ImageFetchError, match="HTTP 503"):
        fetcher_for(stand_in.url, retries=2).fetch("/data/upload/down.png")
    assert stand_in.seen.count("/data/upload/down.png") == 3 and time.perf_counter() - started < 10
    with pytest.raises(ImageFetchError, match="HTTP 404"):
        fetcher_for(stand_in.url).fetch("/data/upload/missing.png")
    assert stand_in.seen.count("/data/upload/missing.png") == 1  # a 404 is an answer, not a hiccup


def test_dropped_connections_are_retried() -> None:
    """A server that closes the first two connections without a word, then answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    accepted: list[int] = []

    def serve() -> None:
        for attempt in range(3):
            conn, _ = listener.accept()
            accepted.append(attempt)
            conn.recv(65536)
            if attempt == 2:
                head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(PNG)}\r\nConnection: close\r\n\r\n".encode()
                conn.sendall(head + PNG)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        image = fetcher_for(f"http://127.0.0.1:{port}").fetch("/data/upload/a.png")
        assert image.shape == (40, 60, 3) and accepted == [0, 1, 2]
    finally:
        thread.join(5)
        listener.close()
    with pytest.raises(ImageHostUnreachableError):  # nobody listening any more: refused, retried, reported
        fetcher_for(f"http://127.0.0.1:{port}", retries=1).fetch("/data/upload/a.png")


def set_job_env(monkeypatch, tiny_vit, model_dir, url: str, **more: str) -> None:
    """The environment of a small, quick training job against the stand-in at ``url`` (``more``: other variables)."""
    for key, value in {
        "MASKCLIP_MODEL": str(tiny_vit.config),
        "MASKCLIP_PRETRAINED": str(tiny_vit.state_dict),
        "MASKCLIP_DEVICE": "cpu",
        "MASKCLIP_SHORT_SIDE": "128",
        "MASKCLIP_TRAIN_CROP": "128",
        "MASKCLIP_FETCH_RETRIES": "1",
        "MODEL_DIR": str(model_dir),
        "LABEL_STUDIO_URL": url,
        "LABEL_STUDIO_API_KEY": "token",
        **more,
    }.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def job_env(monkeypatch, tiny_vit, tmp_path):
    return lambda url: set_job_env(monkeypatch, tiny_vit, tmp_path, url)


def test_a_flaky_export_still_trains(job_env, tmp_path) -> None:
    server = StandIn(project=3, images=4, annotated=3)
    server.failures["/api/projects/3/export"] = 1
    server.failures["/data/upload/1.png"] = 1
    try:
        job_env(server.url)
        from workers.training_job import train_project

        result = train_project(3, trigger="test", options={"iterations": 5})
        assert result["skipped_images"] == 0 and result["version"] == "student-p3-v1"
    finally:
        server.stop()


def test_label_studio_stopping_while_a_job_reads_data(job_env, tmp_path) -> None:
    server = StandIn(project=4, images=12, annotated=6)
    server.stop_after_images = 3
    job_env(server.url)
    from ls_integration.errors import ProjectDataError
    from workers.training_job import train_project

    started = time.perf_counter()
    with pytest.raises(ProjectDataError, match="stopped answering") as failure:
        train_project(4, trigger="test", options={"iterations": 5})
    assert "nothing was trained or stored" in str(failure.value)
    assert time.perf_counter() - started < 60
    assert ModelRegistry(tmp_path).versions(4) == [] and not (tmp_path / "project-4").exists()


def test_settings_bound_the_retries(monkeypatch) -> None:
    monkeypatch.setenv("MASKCLIP_FETCH_RETRIES", "50")
    with pytest.raises(Exception, match="MASKCLIP_FETCH_RETRIES"):
        Settings.from_env()
    assert replace(Settings(), fetch_retries=0).fetch_retries == 0
