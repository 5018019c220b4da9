"""The Label Studio ML backend protocol through Flask's test client."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from backend.app import create_app
from ls_integration.label_config import parse_label_config
from ls_integration.predictor import Predictor
from maskclip_engine import SegmentOptions
from maskclip_service.settings import Settings
from tests.conftest import scene
from tests.http_server import FileServer

BRUSH_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Wall" predicted_values="brick wall,facade"/>
    <Label value="Grass"/>
    <Label value="Sky"/>
  </BrushLabels>
</View>"""

POLYGON_CONFIG = """<View>
  <Image name="photo" value="$url"/>
  <PolygonLabels name="outline" toName="photo"><Label value="Wall"/><Label value="Grass"/></PolygonLabels>
</View>"""


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def label_studio_stub() -> FileServer:
    """Stands in for the Label Studio host's file routes (the end-to-end test uses the real server)."""
    server = FileServer(token="secret-token")
    server.files["/data/upload/1/street.png"] = png_bytes(scene(90, 120, seed=5))
    yield server
    server.close()


@pytest.fixture(scope="module")
def document_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("documents")
    (root / "images").mkdir()
    Image.fromarray(scene(96, 160, seed=1)).save(root / "images" / "a.png")
    Image.fromarray(scene(120, 80, seed=2)).save(root / "images" / "b.jpg")
    return root


@pytest.fixture(scope="module")
def settings(tiny_vit, document_root: Path, label_studio_stub: FileServer, tmp_path_factory) -> Settings:
    return Settings(
        model=str(tiny_vit.config),
        pretrained=str(tiny_vit.state_dict),
        device="cpu",
        label_studio_url=label_studio_stub.url,
        label_studio_api_key="secret-token",
        local_files_root=document_root,
        cache_dir=tmp_path_factory.mktemp("cache"),
        model_dir=tmp_path_factory.mktemp("models"),
        segment=SegmentOptions(short_side=64),
    )


@pytest.fixture(scope="module")
def predictor(settings: Settings) -> Predictor:
    return Predictor.from_settings(settings)


@pytest.fixture
def client(settings: Settings, predictor: Predictor):
    return create_app(settings, predictor).test_client()


def local(path: str) -> dict:
    return {"image": f"/data/local-files/?d={path}"}


def decode_mask(region: dict) -> np.ndarray:
    flat = decode_rle(region["value"]["rle"])
    return flat.reshape(region["original_height"], region["original_width"], 4)[:, :, 3] > 0


def test_health_and_root(client) -> None:
    for path in ("/", "/health"):
        reply = client.get(path)
        assert reply.status_code == 200
        assert reply.json["status"] == "UP" and reply.json["model_version"].startswith("maskclip-tiny-vit-")


def test_setup_returns_the_model_version(client, predictor: Predictor) -> None:
    reply = client.post("/setup", json={"project": "7.1700000000", "schema": BRUSH_CONFIG, "hostname": "x"})
    assert reply.status_code == 200
    version = predictor.maskclip_version(parse_label_config(BRUSH_CONFIG))
    assert reply.json == {"model_version": version}
    assert version.startswith(predictor.base_version) and "-ks-pd" in predictor.base_version
    # The version names the label set: another label set is another version, the same labels the same one.
    other = parse_label_config(BRUSH_CONFIG.replace('value="Sky"', 'value="Cloud"'))
    assert predictor.maskclip_version(other) != version
    assert predictor.maskclip_version(parse_label_config(BRUSH_CONFIG)) == version


def test_setup_rejects_a_config_without_brush_or_polygon_labels(client) -> None:
    config = '<View><Image name="i" value="$image"/><Choices name="c" toName="i"><Choice value="a"/></Choices></View>'
    reply = client.post("/setup", json={"project": "7", "schema": config})
    assert reply.status_code == 400
    assert "<BrushLabels>" in reply.json["error"] and "<PolygonLabels>" in reply.json["error"]
    assert "<Choices>" in reply.json["error"]


def test_predict_several_tasks(client, predictor: Predictor) -> None:
    tasks = [
        {"id": 1, "data": local("images/a.png")},
        {"id": 2, "data": local("images/b.jpg")},
        {"id": 3, "data": {"image": "/data/upload/1/street.png"}},
    ]
    reply = client.post("/predict", json={"tasks": tasks, "label_config": BRUSH_CONFIG, "project": "7.1"})
    assert reply.status_code == 200
    results = reply.json["results"]
    assert len(results) == 3
    sizes = [(160, 96), (80, 120), (120, 90)]
    for prediction, (width, height) in zip(results, sizes):
        assert prediction["model_version"] == predictor.maskclip_version(parse_label_config(BRUSH_CONFIG))
        assert prediction["result"], "every image gets at least one label"
        covered = np.zeros((height, width), dtype=int)
        for region in prediction["result"]:
            assert region["type"] == "brushlabels" and region["from_name"] == "tag" and region["to_name"] == "image"
            assert (region["original_width"], region["original_height"]) == (width, height)
            assert region["value"]["brushlabels"][0] in ("Wall", "Grass", "Sky")
            assert 0 <= region["score"] <= 1
            covered += decode_mask(region)
        assert covered.max() == 1  # labels never overlap
        assert 0 < prediction["score"] <= 1


def test_predict_matches_the_engine(client, predictor: Predictor, document_root: Path) -> None:
    reply = client.post(
        "/predict", json={"tasks": [{"id": 1, "data": local("images/a.png")}], "label_config": BRUSH_CONFIG}
    )
    image = np.asarray(Image.open(document_root / "images" / "a.png").convert("RGB"))
    expected = predictor.segmenter.segment(image, [["Wall", "brick wall", "facade"], "Grass", "Sky"])
    regions = reply.json["results"][0]["result"]
    assert sorted(r["value"]["brushlabels"][0] for r in regions) == sorted(expected.present)
    for region in regions:
        np.testing.assert_array_equal(decode_mask(region), expected.mask(region["value"]["brushlabels"][0]))


def test_polygons_for_polygon_labels(client) -> None:
    tasks = [{"id": 4, "data": {"url": "/data/local-files/?d=images/a.png"}}]
    reply = client.post("/predict", json={"tasks": tasks, "label_config": POLYGON_CONFIG})
    regions = reply.json["results"][0]["result"]
    assert regions and all(r["type"] == "polygonlabels" for r in regions)
    for region in regions:
        points = np.array(region["value"]["points"])
        assert points.shape[1] == 2 and len(points) >= 3
        assert (points >= 0).all() and (points <= 100).all()
        assert region["value"]["polygonlabels"][0] in ("Wall", "Grass")


def test_predict_uses_the_config_from_setup(client) -> None:
    client.post("/setup", json={"project": "9.1", "schema": BRUSH_CONFIG})
    reply = client.post("/predict", json={"tasks": [{"id": 1, "data": local("images/a.png")}], "project": "9.1"})
    assert reply.status_code == 200 and reply.json["results"][0]["result"]


def test_inline_data_urls(client) -> None:
    data = "data:image/png;base64," + base64.b64encode(png_bytes(scene(40, 50))).decode()
    reply = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": data}}], "label_config": BRUSH_CONFIG})
    assert reply.json["results"][0]["result"][0]["original_width"] == 50


@pytest.mark.parametrize("action", ["ANNOTATION_CREATED", "PROJECT_UPDATED"])
def test_webhook_answers_at_once(client, action: str) -> None:
    started = time.perf_counter()
    reply = client.post("/webhook", json={"action": action, "project": {"id": 7}})
    assert reply.status_code == 200
    assert time.perf_counter() - started < 0.5
    assert reply.json["status"] == ("ignored" if action == "PROJECT_UPDATED" else "received")


def test_training_without_a_queue_says_how_to_get_one(client) -> None:
    reply = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}})
    assert reply.status_code == 503 and "REDIS_URL" in reply.json["error"]
    reply = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": "../7"}})
    assert reply.status_code == 400 and "project id" in reply.json["error"]
    assert client.post("/webhook", json={"action": "START_TRAINING"}).status_code == 400


def test_versions(client, predictor: Predictor) -> None:
    client.post("/setup", json={"project": "7", "schema": BRUSH_CONFIG})
    other = BRUSH_CONFIG.replace('value="Sky"', 'value="Cloud"')
    client.post("/setup", json={"project": "8", "schema": other})
    version = predictor.maskclip_version(parse_label_config(BRUSH_CONFIG))
    reply = client.post("/versions", json={"project": "7.1"}).json
    assert reply["versions"] == [version]
    assert reply["details"] == [{"version": version, "model": "maskclip", "active": True}]
    # Label Studio 1.23 asks without a project: every connected project's MaskCLIP version is listed.
    listed = client.get("/versions").json["versions"]
    assert version in listed and predictor.maskclip_version(parse_label_config(other)) in listed


def test_basic_auth_guards_everything_but_health(settings: Settings, predictor: Predictor) -> None:
    from dataclasses import replace

    changed = replace(settings, basic_auth_user="ls", basic_auth_pass="pw")
    guarded = create_app(changed, Predictor(predictor.segmenter, changed)).test_client()
    assert guarded.get("/health").status_code == 200
    assert guarded.post("/setup", json={"project": "1", "schema": BRUSH_CONFIG}).status_code == 401
    assert guarded.get("/versions", auth=("ls", "wrong")).status_code == 401
    assert guarded.get("/versions", auth=("ls", "pw")).status_code == 200


def test_metrics(client) -> None:
    client.get("/health")
    client.post("/predict", json={"tasks": [{"id": 1, "data": local("images/a.png")}], "label_config": BRUSH_CONFIG})
    text = client.get("/metrics").get_data(as_text=True)
    assert "# TYPE maskclip_http_requests_total counter" in text
    assert 'maskclip_http_requests_total{route="/predict",status="200"}' in text
    assert "maskclip_predict_seconds_count" in text
    assert 'maskclip_model_info{device="cpu",version="maskclip-tiny-vit-' in text


def test_model_versions_name_what_changes_the_masks() -> None:
    from ls_integration.predictor import model_version

    default = SegmentOptions()
    assert model_version("ViT-B-16+quickgelu", "tag:openai", default) == "maskclip-ViT-B-16-openai-ks-pd"
    assert model_version("RN50", "tag:openai", default.replace(key_smoothing=False)) == "maskclip-RN50-openai-pd"
    assert model_version("ViT-B-16", "tag:laion2b_s34b_b88k", default.replace(dense_mode="naclip")) == (
        "naclip-ViT-B-16-laion2b_s34b_b88k-ks-pd"
    )
    local = model_version("ViT-B-16+quickgelu", "sha256:0123456789abcdef", default)
    assert local == "maskclip-ViT-B-16-w01234567-ks-pd-qg"
    tuned = model_version("ViT-B-16+quickgelu", "tag:openai", default.replace(bg_threshold=0.3))
    assert tuned.startswith("maskclip-ViT-B-16-openai-ks-pd-") and tuned != model_version(
        "ViT-B-16+quickgelu", "tag:openai", default.replace(bg_threshold=0.4)
    )
    assert model_version("ViT-B-16", "tag:openai", default.replace(batch_size=2)) == "maskclip-ViT-B-16-openai-ks-pd"
