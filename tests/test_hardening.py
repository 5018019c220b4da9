"""Small holes closed: odd auth headers, Unicode digits as ids, task ids in API paths, root in Docker, cache bounds."""

from __future__ import annotations

import base64
from dataclasses import replace
from pathlib import Path

import pytest

from backend.app import create_app
from ls_integration.auth import LabelStudioAuth
from ls_integration.errors import ImageFetchError
from ls_integration.fetching import ImageFetcher
from ls_integration.ids import is_id
from ls_integration.predictor import Predictor
from maskclip_engine.students.checkpoint import StudentCheckpoint
from maskclip_engine.students.network import StudentConfig, StudentNet
from maskclip_engine.students.registry import ModelRegistry
from tests.test_backend_protocol import (  # noqa: F401  (fixtures)
    BRUSH_CONFIG,
    document_root,
    label_studio_stub,
    predictor,
    settings,
)

ROOT = Path(__file__).resolve().parent.parent


def basic(raw: bytes) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


def test_odd_basic_auth_headers_get_401_not_500(settings, predictor) -> None:  # noqa: F811
    guarded = replace(settings, basic_auth_user="admin", basic_auth_pass="pässwörd")
    client = create_app(guarded, Predictor(predictor.segmenter, guarded)).test_client()
    body = {"tasks": [], "label_config": BRUSH_CONFIG}
    for headers in (
        basic("admin:pässwörd".encode("latin-1")),  # not UTF-8
        basic(b"\xff\xfe:\x80"),
        basic("ädmin:x".encode()),
        {"Authorization": "Basic äöü"},  # not even base64 of ASCII
        {"Authorization": "Basic"},
        {"Authorization": "Bearer x"},
    ):
        reply = client.post("/predict", json=body, headers=headers)
        assert reply.status_code == 401 and "basic-auth" in reply.json["error"]
    assert client.post("/predict", json=body, headers=basic("admin:pässwörd".encode())).status_code == 200
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("project", ["²", "1²", "١٢", "１２", "12\n", "1" * 30, "-1", "1 2"])
def test_project_ids_are_ascii_digits(client_factory, project: str) -> None:
    client = client_factory()
    assert client.post("/setup", json={"project": project, "schema": BRUSH_CONFIG}).status_code == 400
    reply = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": project}})
    assert reply.status_code == 400
    reply = client.post("/predict", json={"tasks": [], "label_config": BRUSH_CONFIG, "project": project})
    assert reply.status_code == 400


@pytest.fixture
def client_factory(settings, predictor):  # noqa: F811
    return lambda: create_app(settings, predictor).test_client()


def test_is_id() -> None:
    assert is_id("12") and is_id(12) and is_id("0")
    assert not any(is_id(v) for v in ("²", "", "1.5", " 1", True, -3, None, 1.0, "1" * 19))


def test_task_ids_are_checked_before_they_reach_an_api_path(settings, label_studio_stub) -> None:  # noqa: F811
    fetcher = ImageFetcher(settings, LabelStudioAuth(label_studio_stub.url, "secret-token"))
    before = len(label_studio_stub.seen)
    for task_id in ("1/../../api/users", "²", "1?x=", -1):
        with pytest.raises(ImageFetchError, match="not a Label Studio task id"):
            fetcher.read_bytes("s3://bucket/a.png", task_id)
    assert len(label_studio_stub.seen) == before  # nothing was sent
    with pytest.raises(ImageFetchError, match="HTTP 404"):  # a real id goes through to the server
        fetcher.read_bytes("s3://bucket/a.png", 7)
    assert label_studio_stub.seen[-1][0].startswith("/tasks/7/presign/")


def test_docker_image_runs_as_an_unprivileged_user() -> None:
    lines = [line.split() for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("USER ")]
    assert lines and lines[-1][1] not in ("root", "0")


def test_loaded_students_are_bounded(settings, predictor, tmp_path) -> None:  # noqa: F811
    bounded = replace(settings, model_dir=tmp_path, student_cache_size=2)
    served = Predictor(predictor.segmenter, bounded)
    net = StudentNet(StudentConfig(), predictor.segmenter.text_embeddings(["wall", "grass"]))
    registry = ModelRegistry(tmp_path)
    versions = [registry.add(3, StudentCheckpoint(net, ["wall", "grass"], [["wall"], ["grass"]], {})) for _ in range(3)]
    first = served._load_student(versions[0])
    served._load_student(versions[1])
    assert served._load_student(versions[0]) is first  # a hit refreshes it ...
    served._load_student(versions[2])  # ... so the least recently used one (v2) is dropped
    assert list(served._students) == [versions[0].checkpoint, versions[2].checkpoint]
