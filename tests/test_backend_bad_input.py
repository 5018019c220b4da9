"""Bad requests get clear errors; bad tasks get empty predictions; the server keeps serving."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from backend.app import create_app
from ls_integration.predictor import Predictor
from tests.conftest import scene
from tests.http_server import FileServer
from tests.test_backend_protocol import (  # noqa: F401  (fixtures)
    BRUSH_CONFIG,
    document_root,
    label_studio_stub,
    local,
    png_bytes,
    predictor,
    settings,
)


@pytest.fixture
def client(settings, predictor):  # noqa: F811
    return create_app(settings, predictor).test_client()


def client_with(settings, predictor, **changes):  # noqa: F811
    """A backend with other settings around the same loaded model."""
    from dataclasses import replace

    changed = replace(settings, **changes)
    return create_app(changed, Predictor(predictor.segmenter, changed)).test_client()


def bomb_png(side: int = 30000) -> bytes:
    """A tiny file that claims side x side pixels (1-bit, all zero): a decompression bomb."""
    raw = zlib.compress(b"".join(b"\x00" + b"\x00" * ((side + 7) // 8) for _ in range(64)))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def test_malformed_bodies(client) -> None:
    reply = client.post("/predict", data="{not json", content_type="application/json")
    assert reply.status_code == 400 and "JSON object" in reply.json["error"]
    reply = client.post("/predict", json=["a", "list"])
    assert reply.status_code == 400
    reply = client.post("/predict", json={"label_config": BRUSH_CONFIG})
    assert reply.status_code == 400 and "'tasks'" in reply.json["error"]
    reply = client.post("/predict", json={"tasks": []})
    assert reply.status_code == 400 and "label_config" in reply.json["error"]
    reply = client.post("/predict", json={"tasks": [], "label_config": "<View><Image"})
    assert reply.status_code == 400 and "not valid XML" in reply.json["error"]
    reply = client.post("/setup", json={"schema": BRUSH_CONFIG})
    assert reply.status_code == 400 and "'project'" in reply.json["error"]
    assert client.get("/predict").status_code == 405
    assert client.get("/nothing-here").status_code == 404


def test_broken_tasks_get_empty_predictions_and_neighbours_do_not(client, document_root, tmp_path) -> None:  # noqa: F811
    (document_root / "bad").mkdir(exist_ok=True)
    (document_root / "bad" / "text.png").write_bytes(b"this is not an image at all")
    jpeg = io.BytesIO()
    Image.fromarray(scene(200, 200)).save(jpeg, format="JPEG")
    (document_root / "bad" / "truncated.jpg").write_bytes(jpeg.getvalue()[:2000])
    (document_root / "bad" / "bomb.png").write_bytes(bomb_png())
    (tmp_path / "secret.png").write_bytes(png_bytes(scene(20, 20)))

    tasks = [
        {"id": 1, "data": local("images/a.png")},
        {"id": 2, "data": local("bad/text.png")},
        {"id": 3, "data": local("bad/truncated.jpg")},
        {"id": 4, "data": local("bad/bomb.png")},
        {"id": 5, "data": {"image": "/data/upload/1/missing.png"}},  # 404 from Label Studio
        {"id": 6, "data": local("../" * 8 + str(tmp_path / "secret.png"))},  # outside the root
        {"id": 7, "data": {"image": 42}},
        {"id": 8, "data": {}},
        {"id": 9},
        {"id": 10, "data": {"image": "ftp://example.org/a.png"}},
        {"id": 11, "data": local("images/b.jpg")},
    ]
    reply = client.post("/predict", json={"tasks": tasks, "label_config": BRUSH_CONFIG})
    assert reply.status_code == 200
    results = reply.json["results"]
    assert len(results) == len(tasks)
    assert results[0]["result"] and results[-1]["result"]
    for prediction in results[1:-1]:
        assert prediction == []  # no prediction stored: the next Retrieve Predictions asks for it again
    assert client.get("/health").json["status"] == "UP"
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'maskclip_task_failures_total{reason="http_error"}' in metrics
    assert 'maskclip_task_failures_total{reason="too_large"}' in metrics


def test_foreign_hosts_are_never_contacted(client) -> None:
    foreign = FileServer(host="127.0.0.2")
    foreign.files["/cat.png"] = png_bytes(scene(30, 30))
    try:
        tasks = [{"id": 1, "data": {"image": f"{foreign.url}/cat.png"}}]
        reply = client.post("/predict", json={"tasks": tasks, "label_config": BRUSH_CONFIG})
        assert reply.json["results"][0] == []
        assert foreign.seen == []
    finally:
        foreign.close()


def test_redirects_off_the_label_studio_host_are_refused(client, label_studio_stub) -> None:  # noqa: F811
    foreign = FileServer(host="127.0.0.2")
    foreign.files["/cat.png"] = png_bytes(scene(30, 30))
    label_studio_stub.redirects["/data/upload/1/moved.png"] = f"{foreign.url}/cat.png"
    try:
        tasks = [{"id": 1, "data": {"image": "/data/upload/1/moved.png"}}]
        reply = client.post("/predict", json={"tasks": tasks, "label_config": BRUSH_CONFIG})
        assert reply.json["results"][0] == []
        assert foreign.seen == []
    finally:
        foreign.close()


def test_allowed_hosts_get_no_credentials(settings, predictor, label_studio_stub) -> None:  # noqa: F811
    foreign = FileServer(host="127.0.0.2")
    foreign.files["/cat.png"] = png_bytes(scene(30, 30))
    try:
        tasks = [{"id": 1, "data": {"image": f"{foreign.url}/cat.png"}}]
        # An entry matches scheme, host and port: the host name alone, or another scheme, is not enough.
        for entries in (("127.0.0.2",), (f"https://127.0.0.2:{foreign.port}",), ("127.0.0.2:1",)):
            refused = client_with(settings, predictor, allowed_hosts=entries)
            reply = refused.post("/predict", json={"tasks": tasks, "label_config": BRUSH_CONFIG})
            assert reply.json["results"][0] == []
        assert foreign.seen == []
        allowed = client_with(settings, predictor, allowed_hosts=(f"127.0.0.2:{foreign.port}",))
        tasks = [
            {"id": 1, "data": {"image": f"{foreign.url}/cat.png"}},
            {"id": 2, "data": {"image": f"{label_studio_stub.url}/data/upload/1/street.png"}},
        ]
        reply = allowed.post("/predict", json={"tasks": tasks, "label_config": BRUSH_CONFIG})
        assert all(p["result"] for p in reply.json["results"])
        assert foreign.seen == [("/cat.png", None)]  # the Label Studio token never leaves its host
        assert ("/data/upload/1/street.png", "Token secret-token") in label_studio_stub.seen
    finally:
        foreign.close()


def test_download_size_limit(settings, predictor, label_studio_stub) -> None:  # noqa: F811
    label_studio_stub.files["/data/upload/1/big.png"] = png_bytes(
        np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    )
    small = client_with(settings, predictor, max_image_bytes=10_000)
    reply = small.post(
        "/predict",
        json={"tasks": [{"id": 1, "data": {"image": "/data/upload/1/big.png"}}], "label_config": BRUSH_CONFIG},
    )
    assert reply.json["results"][0] == []


def test_three_hundred_labels(client) -> None:
    labels = "".join(f'<Label value="class {i}"/>' for i in range(300))
    config = f'<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">{labels}</BrushLabels>'
    config += "</View>"
    reply = client.post("/predict", json={"tasks": [{"id": 1, "data": local("images/a.png")}], "label_config": config})
    assert reply.status_code == 200
    regions = reply.json["results"][0]["result"]
    assert regions and all(r["value"]["brushlabels"][0].startswith("class ") for r in regions)


def test_too_many_labels_is_a_clear_error(settings, predictor) -> None:  # noqa: F811
    limited = client_with(settings, predictor, max_labels=10)
    labels = "".join(f'<Label value="c{i}"/>' for i in range(11))
    config = (
        f'<View><Image name="image" value="$image"/><BrushLabels name="t" toName="image">{labels}</BrushLabels></View>'
    )
    reply = limited.post("/setup", json={"project": "1", "schema": config})
    assert reply.status_code == 400 and "MASKCLIP_MAX_LABELS" in reply.json["error"]
