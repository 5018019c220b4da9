"""Agreement of annotations with their proposals: the mask math, Label Studio regions, the per-project records,
the webhook's job (a real RQ worker on a real Redis against a stand-in Label Studio on 127.0.0.1), /metrics and
the project page through Flask's test client."""

from __future__ import annotations

import json
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from rq import Queue, SimpleWorker

from backend.app import create_app
from ls_integration.agreement import AgreementRecords, compare_annotation, proposal_for, summarise
from ls_integration.label_config import parse_label_config
from ls_integration.project_links import ProjectLink
from ls_integration.rle import encode_mask
from maskclip_engine.evaluation.annotation_agreement import compare_label_maps
from maskclip_service.job_paths import COMPARE_ANNOTATION
from maskclip_service.preannotation_runs import PreannotationRun
from tests.embedded_redis import embedded_redis
from tests.http_server import FileServer
from tests.label_studio_server import brush_config
from tests.test_retries import set_job_env

NAMES = ["wall", "grass", "sky"]
CONTROL = parse_label_config(brush_config(NAMES)).controls[0]
QUEUE = "agreement-test"


# ----------------------------------------------------------------------------- the math
def test_identical_masks_agree_fully() -> None:
    labels = np.full((40, 60), -1)
    labels[:20] = 0
    labels[20:, :30] = 2
    result = compare_label_maps(labels, labels.copy(), NAMES)
    assert result.mean_iou == 1.0 and result.pixel_accuracy == 1.0 and result.kept == 1.0
    assert result.per_label == {"wall": 1.0, "sky": 1.0}  # grass is in neither: not scored


def test_disjoint_masks_agree_not_at_all() -> None:
    proposal, annotation = np.full((40, 60), -1), np.full((40, 60), -1)
    proposal[:, :30] = 0
    annotation[:, 30:] = 0
    result = compare_label_maps(proposal, annotation, NAMES)
    assert result.mean_iou == 0.0 and result.kept == 0.0 and result.pixel_accuracy == 0.0


def test_a_half_kept_proposal_scores_about_half() -> None:
    proposal = np.full((40, 60), -1)
    proposal[:, :40] = 1
    annotation = proposal.copy()
    annotation[:, 20:40] = -1  # the annotator erased half of the proposed grass
    result = compare_label_maps(proposal, annotation, NAMES)
    assert result.mean_iou == pytest.approx(0.5) and result.kept == pytest.approx(0.5)
    assert result.pixel_accuracy == pytest.approx(1 - 20 / 60)


def test_relabelled_region_counts_against_both_labels() -> None:
    proposal = np.zeros((10, 10), dtype=int)
    annotation = proposal.copy()
    annotation[:, :5] = 1  # half of the wall is grass after all
    result = compare_label_maps(proposal, annotation, NAMES)
    assert result.per_label == {"wall": 0.5, "grass": 0.0}
    assert result.mean_iou == 0.25 and result.kept == 0.5


def test_nothing_drawn_on_either_side_needs_no_fixing() -> None:
    empty = np.full((8, 8), -1)
    assert compare_label_maps(empty, empty, NAMES).mean_iou == 1.0


def test_bad_maps_are_refused() -> None:
    with pytest.raises(ValueError, match="one shape"):
        compare_label_maps(np.zeros((4, 4), int), np.zeros((4, 5), int), NAMES)
    with pytest.raises(ValueError, match="label indices"):
        compare_label_maps(np.full((4, 4), 3), np.zeros((4, 4), int), NAMES)


# ----------------------------------------------------------------------------- Label Studio regions
def brush(mask: np.ndarray, label: str) -> dict:
    height, width = mask.shape
    return {
        "from_name": "tag",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": width,
        "original_height": height,
        "value": {"format": "rle", "rle": encode_mask(mask), "brushlabels": [label]},
    }


def polygon(points: list[tuple[float, float]], label: str) -> dict:
    return {
        "from_name": "tag",
        "to_name": "image",
        "type": "polygonlabels",
        "value": {"points": [list(p) for p in points], "polygonlabels": [label]},
    }


def left_half(height: int = 30, width: int = 40) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[:, : width // 2] = True
    return mask


def test_brush_annotation_against_its_brush_proposal() -> None:
    prediction = {"id": 7, "task": 3, "model_version": "maskclip-x", "result": [brush(left_half(), "wall")]}
    kept = {"id": 11, "task": 3, "result": [brush(left_half(), "wall")]}
    record = compare_annotation(kept, prediction, CONTROL)
    assert record["mean_iou"] == 1.0 and record["version"] == "maskclip-x" and record["annotation"] == 11
    repainted = {"id": 12, "task": 3, "result": [brush(~left_half(), "sky")]}
    record = compare_annotation(repainted, prediction, CONTROL)
    assert record["mean_iou"] == 0.0 and record["per_label"] == {"wall": 0.0, "sky": 0.0}


def test_polygon_annotation_against_a_brush_proposal() -> None:
    prediction = {"id": 1, "model_version": "v", "result": [brush(left_half(300, 400), "grass")]}
    annotation = {"id": 2, "task": 1, "result": [polygon([(0, 0), (50, 0), (50, 100), (0, 100)], "grass")]}
    assert compare_annotation(annotation, prediction, CONTROL)["mean_iou"] > 0.98
    quarter = {"id": 3, "task": 1, "result": [polygon([(0, 0), (25, 0), (25, 100), (0, 100)], "grass")]}
    assert compare_annotation(quarter, prediction, CONTROL)["mean_iou"] == pytest.approx(0.5, abs=0.02)


def test_the_proposal_is_the_parent_prediction_else_the_latest_before_the_annotation() -> None:
    older = {"id": 1, "created_at": "2026-01-01T00:00:00", "result": []}
    newer = {"id": 2, "created_at": "2026-01-03T00:00:00", "result": []}
    assert proposal_for({"parent_prediction": 1}, [older, newer]) is older
    assert proposal_for({"created_at": "2026-01-02T00:00:00"}, [older, newer]) is older
    assert proposal_for({}, [older, newer]) is newer
    assert proposal_for({}, []) is None


# ----------------------------------------------------------------------------- records
def test_records_survive_a_restart_and_an_update_replaces_the_earlier_one(tmp_path: Path) -> None:
    AgreementRecords(tmp_path, 4).add({"annotation": 9, "version": "a", "mean_iou": 0.2, "per_label": {}})
    AgreementRecords(tmp_path, 4).add({"annotation": 3, "version": "a", "mean_iou": 1.0, "per_label": {}})
    AgreementRecords(tmp_path, 4).add({"annotation": 9, "version": "a", "mean_iou": 0.6, "per_label": {}})
    records = AgreementRecords(tmp_path, 4).records()  # a new reader, as after a restart
    assert [(r["annotation"], r["mean_iou"]) for r in records] == [(3, 1.0), (9, 0.6)]
    assert AgreementRecords(tmp_path, 5).records() == []


def test_concurrent_appends_lose_no_record(tmp_path: Path) -> None:
    def write(start: int) -> None:
        records = AgreementRecords(tmp_path, 1)
        for i in range(start, start + 50):
            records.add({"annotation": i, "version": "v", "mean_iou": 0.5, "per_label": {"x": "y" * 300}})

    threads = [threading.Thread(target=write, args=(k * 50,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r["annotation"] for r in AgreementRecords(tmp_path, 1).records()] == list(range(200))


def test_summary_by_version() -> None:
    rows = [
        {"annotation": 1, "version": "m", "mean_iou": 1.0, "pixel_accuracy": 1.0, "kept": 1.0, "per_label": {"a": 1}},
        {"annotation": 2, "version": "m", "mean_iou": 0.0, "pixel_accuracy": 0.2, "kept": 0.0, "per_label": {"a": 0}},
        {"annotation": 3, "version": "s", "mean_iou": 0.8, "pixel_accuracy": 0.9, "kept": 0.9, "per_label": {"b": 0.8}},
    ]
    summary = {row["version"]: row for row in summarise(rows)}
    assert summary["m"]["annotations"] == 2 and summary["m"]["mean_iou"] == 0.5
    assert summary["m"]["per_label"] == {"a": 0.5} and summary["s"]["per_label"] == {"b": 0.8}


# ----------------------------------------------------------------------------- backend: webhook, job, metrics, page
@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    with embedded_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def stand_in():
    """Label Studio's annotation, project and prediction routes for project 3, task 5 on 127.0.0.1."""
    server = FileServer(token="token")
    server.files["/api/projects/3"] = json.dumps({"id": 3, "label_config": brush_config(NAMES)}).encode()
    prediction = {"id": 40, "task": 5, "model_version": "maskclip-test", "result": [brush(left_half(), "wall")]}
    server.files["/api/predictions/"] = json.dumps([prediction]).encode()
    half = left_half()
    half[15:] = False  # the annotator kept the top half of the proposed wall
    server.files["/api/annotations/21/"] = json.dumps({"id": 21, "task": 5, "result": [brush(half, "wall")]}).encode()
    yield server
    server.close()


@pytest.fixture
def app_for(monkeypatch, tiny_vit, tmp_path, redis_server, stand_in, predictor):  # noqa: F811
    from dataclasses import replace

    from ls_integration.predictor import Predictor

    redis_server.flushall()
    url = f"unix://{redis_server.socket_file}"
    set_job_env(monkeypatch, tiny_vit, tmp_path, stand_in.url, REDIS_URL=url, MASKCLIP_QUEUE=QUEUE)

    def build(**changes):
        changed = replace(
            predictor.settings, model_dir=tmp_path, redis_url=url, queue_name=QUEUE, train_every=0, **changes
        )
        return create_app(changed, Predictor(predictor.segmenter, changed))

    return build


from tests.test_backend_protocol import (  # noqa: E402, F401  (fixtures)
    document_root,
    label_studio_stub,
    predictor,
    settings,
)


def link(app, project: int = 3) -> None:
    app.extensions["maskclip"].predictor.link_project(
        str(project), ProjectLink("http://127.0.0.1:1", "token", brush_config(NAMES))
    )


def test_webhook_queues_the_comparison_and_the_job_keeps_its_record(app_for, redis_server, tmp_path) -> None:
    app = app_for()
    client = app.test_client()
    body = {"action": "ANNOTATION_CREATED", "project": {"id": 3}, "annotation": {"id": 21, "task": 5}}
    reply = client.post("/webhook", json=body)
    assert reply.status_code == 200 and reply.json["agreement"]["status"] == "queued"
    queue = Queue(QUEUE, connection=redis_server)
    assert [job.func_name for job in queue.jobs] == [COMPARE_ANNOTATION]
    SimpleWorker([queue], connection=redis_server).work(burst=True)
    [record] = AgreementRecords(tmp_path, 3).records()
    assert record["annotation"] == 21 and record["version"] == "maskclip-test"
    assert record["mean_iou"] == pytest.approx(0.5) and record["kept"] == pytest.approx(0.5)

    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'maskclip_annotation_agreement_iou_bucket{le="0.5",project="3",version="maskclip-test"} 1.0' in metrics
    assert 'maskclip_annotation_agreement_iou_count{project="3",version="maskclip-test"} 1.0' in metrics

    link(app)
    status = client.get("/projects/3/status").json
    [agreement] = status["agreement"]
    assert agreement["version"] == "maskclip-test" and agreement["annotations"] == 1
    assert agreement["per_label"] == {"wall": 0.5}


def test_a_webhook_without_an_annotation_id_still_answers(app_for) -> None:
    client = app_for().test_client()
    reply = client.post("/webhook", json={"action": "ANNOTATION_UPDATED", "project": {"id": 3}})
    assert reply.status_code == 200 and reply.json["agreement"]["status"] == "ignored"


def test_unknown_project_is_a_json_404(app_for) -> None:
    client = app_for().test_client()
    for path in ("/projects/77/status", "/projects/77/"):
        reply = client.get(path)
        assert reply.status_code == 404 and "unknown" in reply.json["error"] and reply.json["project"] == 77
    reply = client.get("/projects/not-a-number/status")
    assert reply.status_code == 404 and "not a Label Studio project id" in reply.json["error"]


def test_an_empty_project_is_still_a_useful_page(app_for) -> None:
    app = app_for()
    link(app, 8)
    client = app.test_client()
    status = client.get("/projects/8/status").json
    assert status["link"]["status"] == "linked" and "access_token" not in json.dumps(status)
    assert status["runs"] == [] and status["agreement"] == [] and status["review"] is None
    [maskclip] = status["versions"]
    assert maskclip["model"] == "maskclip" and maskclip["active"] and maskclip["heldout_miou"] is None
    page = client.get("/projects/8/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    text = page.get_data(as_text=True)
    assert "No pre-annotation run" in text and "No annotation compared yet" in text and 'id="agreement-plot"' in text
    assert client.get("/projects/8").status_code == 308


def test_a_project_whose_link_is_gone_says_so(app_for, tmp_path) -> None:
    AgreementRecords(tmp_path, 9).add(
        {"annotation": 1, "version": "m", "mean_iou": 1.0, "pixel_accuracy": 1.0, "kept": 1.0, "per_label": {}}
    )
    client = app_for().test_client()
    status = client.get("/projects/9/status").json
    assert status["link"]["status"] == "missing" and "connected again" in status["link"]["message"]
    assert status["agreement"][0]["annotations"] == 1
    assert "no link to project 9" in client.get("/projects/9/").get_data(as_text=True)


def test_runs_students_and_the_plot(app_for, redis_server, tmp_path) -> None:
    app = app_for()
    link(app, 5)
    run, _ = PreannotationRun.start(redis_server, 5, task_ids=[1, 2, 3, 4], queue_name="elsewhere")
    redis_server.hset(run.key, mapping={"total": 4, "done": 3, "predicted": 2, "failed": 1, "phase": "working"})
    redis_server.rpush(run.failures_key, json.dumps({"task": 4, "reason": "the image is missing (HTTP 404)"}))
    folder = tmp_path / "project-5"
    (folder / "v1.pt").write_bytes(b"not read by the page")
    metrics = {"held_out_miou": 0.71, "baseline": "maskclip", "baseline_miou": 0.6, "gain_low": 0.05, "gain_high": 0.2}
    info = {"created": "2026-12-01T10:00:00Z", "annotated": 12}
    (folder / "v1.json").write_text(json.dumps({"metrics": metrics, "info": info}))
    for i, (version, iou) in enumerate([("m", 0.3), ("m", 0.4), ("student-p5-v1", 0.8), ("student-p5-v1", 0.9)]):
        AgreementRecords(tmp_path, 5).add(
            {"annotation": i + 1, "version": version, "mean_iou": iou, "pixel_accuracy": iou, "kept": iou,
             "per_label": {"wall": iou}}
        )  # fmt: skip
    client = app.test_client()
    status = client.get("/projects/5/status").json
    [row] = status["runs"]
    assert (row["state"], row["total"], row["done"], row["predicted"], row["failed"]) == ("working", 4, 3, 2, 1)
    assert row["failures"] == [{"task": 4, "reason": "the image is missing (HTTP 404)"}]
    student = status["versions"][1]
    assert student["name"] == "student-p5-v1" and student["heldout_miou"] == 0.71 and student["annotations"] == 12
    assert student["gate"]["decision"] == "passed" and not student["active"]  # no active.json: MaskCLIP serves
    text = client.get("/projects/5/").get_data(as_text=True)
    assert "the image is missing (HTTP 404)" in text and "student-p5-v1" in text
    svg = ET.fromstring(text[text.index("<svg") : text.index("</svg>") + 6])
    circles = [e for e in svg.iter() if e.tag.endswith("circle")]
    assert len(circles) == 4 and len({c.get("fill") for c in circles}) == 2  # one colour per version
    heights = [float(c.get("cy")) for c in circles]
    assert heights == sorted(heights, reverse=True)  # higher IoU is drawn higher up


def test_the_page_is_behind_the_same_auth(app_for) -> None:
    app = app_for(basic_auth_user="u", basic_auth_pass="p")
    link(app, 8)
    client = app.test_client()
    assert client.get("/projects/8/status").status_code == 401
    assert client.get("/projects/8/status", auth=("u", "p")).status_code == 200
