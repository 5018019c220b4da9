"""Each request's work is bounded: over-limit bodies, task lists and label sets get a 4xx naming the limit."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests
from werkzeug.serving import make_server

from backend.app import create_app
from tests.test_backend_bad_input import client_with
from tests.test_backend_protocol import (  # noqa: F401  (fixtures)
    BRUSH_CONFIG,
    document_root,
    label_studio_stub,
    local,
    predictor,
    settings,
)


def config_with(controls: int, labels: int, synonyms: int = 0) -> str:
    parts = []
    for c in range(controls):
        values = "".join(
            f'<Label value="c{c}l{i}" predicted_values="{",".join(f"s{c}-{i}-{k}" for k in range(synonyms))}"/>'
            for i in range(labels)
        )
        parts.append(f'<BrushLabels name="t{c}" toName="image">{values}</BrushLabels>')
    return f'<View><Image name="image" value="$image"/>{"".join(parts)}</View>'


def test_labels_and_synonyms_count_over_all_controls(settings, predictor) -> None:  # noqa: F811
    limited = client_with(settings, predictor, max_labels=10, max_prompts=30)
    assert limited.post("/setup", json={"project": "1", "schema": config_with(2, 5)}).status_code == 200
    reply = limited.post("/setup", json={"project": "1", "schema": config_with(2, 6)})  # 12 labels over 2 controls
    assert reply.status_code == 400 and "MASKCLIP_MAX_LABELS" in reply.json["error"]
    reply = limited.post("/setup", json={"project": "1", "schema": config_with(2, 4, synonyms=3)})  # 32 prompts
    assert reply.status_code == 400 and "MASKCLIP_MAX_PROMPTS" in reply.json["error"]
    reply = limited.post("/predict", json={"tasks": [], "label_config": config_with(3, 4)})
    assert reply.status_code == 400 and "MASKCLIP_MAX_LABELS" in reply.json["error"]


def test_too_many_tasks(settings, predictor) -> None:  # noqa: F811
    limited = client_with(settings, predictor, max_tasks=5)
    tasks = [{"id": i, "data": local("images/a.png")} for i in range(6)]
    reply = limited.post("/predict", json={"tasks": tasks, "label_config": BRUSH_CONFIG})
    assert reply.status_code == 413 and "MASKCLIP_MAX_TASKS" in reply.json["error"]
    reply = limited.post("/predict", json={"tasks": tasks[:5], "label_config": BRUSH_CONFIG})
    assert reply.status_code == 200 and len(reply.json["results"]) == 5


def test_body_size_limit(settings, predictor) -> None:  # noqa: F811
    limited = client_with(settings, predictor, max_request_bytes=10_000)
    padding = "x" * 20_000
    reply = limited.post("/predict", json={"tasks": [], "label_config": BRUSH_CONFIG, "pad": padding})
    assert reply.status_code == 413 and "MASKCLIP_MAX_REQUEST_BYTES" in reply.json["error"]
    reply = limited.post(
        "/setup", data=json.dumps({"project": "1", "schema": padding}), content_type="application/json"
    )
    assert reply.status_code == 413
    assert limited.get("/health").json["status"] == "UP"


def test_flood_of_over_limit_requests_leaves_the_server_responsive(settings, predictor) -> None:  # noqa: F811
    from dataclasses import replace

    from ls_integration.predictor import Predictor

    changed = replace(settings, max_request_bytes=100_000, max_tasks=5)
    app = create_app(changed, Predictor(predictor.segmenter, changed))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    big = json.dumps({"tasks": [], "label_config": BRUSH_CONFIG, "pad": "x" * 2_000_000})
    many = {"tasks": [{"id": i, "data": {}} for i in range(50)], "label_config": BRUSH_CONFIG}

    def flood(index: int) -> int:
        try:
            if index % 2:
                body = big
            else:
                body = json.dumps(many)
            return requests.post(
                f"{url}/predict", data=body, headers={"Content-Type": "application/json"}, timeout=30
            ).status_code
        except requests.ConnectionError:
            return 413  # the server may close the socket once it has answered 413 to a body it will not read

    try:
        with ThreadPoolExecutor(8) as pool:
            statuses = pool.map(flood, range(40))
            started = time.perf_counter()
            health = requests.get(f"{url}/health", timeout=10)
            elapsed = time.perf_counter() - started
            assert set(statuses) == {413}
        assert health.json()["status"] == "UP" and elapsed < 5
        fine = requests.post(f"{url}/predict", json={"tasks": [], "label_config": BRUSH_CONFIG}, timeout=30)
        assert fine.status_code == 200
    finally:
        server.shutdown()
