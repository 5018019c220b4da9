"""Smart tools through the HTTP protocol, with the JSON Label Studio 1.23.2 sends for interactive calls.

Label Studio's ``MLBackend.interactive_annotating`` posts ``/predict`` with one
serialised task and ``params = {"login", "password", "context"}``; the context
holds the regions the annotator just drew (shapes from its frontend).
"""

from __future__ import annotations

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

LABELS = ("Wall", "Grass", "Sky")
CONFIG = f"""<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image" smart="true">
    {"".join(f'<Label value="{label}" smart="true"/>' for label in LABELS)}
  </KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true">
    {"".join(f'<Label value="{label}"/>' for label in LABELS)}
  </RectangleLabels>
  <TextArea name="prompt" toName="image" editable="true" rows="1" maxSubmissions="1" showSubmitButton="true"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Wall" predicted_values="brick wall"/><Label value="Grass"/><Label value="Sky"/>
  </BrushLabels>
</View>"""
POLYGON_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="Wall"/></RectangleLabels>
  <PolygonLabels name="outline" toName="image"><Label value="Wall"/><Label value="Grass"/></PolygonLabels>
</View>"""
WIDTH, HEIGHT = 160, 96


@pytest.fixture(scope="module")
def document_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("documents")
    Image.fromarray(scene(HEIGHT, WIDTH, seed=1)).save(root / "a.png")
    Image.fromarray(scene(HEIGHT, WIDTH, seed=2)).save(root / "b.png")
    return root


@pytest.fixture(scope="module")
def predictor(tiny_vit, document_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    settings = Settings(
        model=str(tiny_vit.config),
        pretrained=str(tiny_vit.state_dict),
        device="cpu",
        local_files_root=document_root,
        cache_dir=tmp_path_factory.mktemp("cache"),
        model_dir=tmp_path_factory.mktemp("models"),
        segment=SegmentOptions(short_side=64),
        feature_cache_mb=16,
    )
    return Predictor.from_settings(settings)


@pytest.fixture
def client(predictor: Predictor):
    return create_app(predictor.settings, predictor).test_client()


def task(name: str = "a.png", task_id: int = 7) -> dict:
    """A task as Label Studio's InteractiveAnnotatingDataSerializer writes it."""
    return {
        "id": task_id,
        "data": {"image": f"/data/local-files/?d={name}"},
        "meta": {},
        "created_at": "2026-11-29T10:00:00.000000Z",
        "updated_at": "2026-11-29T10:00:00.000000Z",
        "is_labeled": False,
        "overlap": 1,
        "inner_id": 1,
        "total_annotations": 0,
        "cancelled_annotations": 0,
        "total_predictions": 0,
        "project": 3,
        "updated_by": None,
        "file_upload": None,
        "annotations": [],
        "predictions": [],
        "drafts": [],
    }


def keypoint(x: float, y: float, label: str | None = "Grass", positive: bool = True) -> dict:
    value = {"x": x, "y": y, "width": 0.625}
    if label is not None:
        value["keypointlabels"] = [label]
    return {
        "id": f"kp{int(x * 10)}{int(y * 10)}",
        "original_width": WIDTH,
        "original_height": HEIGHT,
        "image_rotation": 0,
        "value": value,
        "is_positive": positive,
        "from_name": "kp",
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
    }


def rectangle(x: float, y: float, width: float, height: float, label: str = "Sky", from_name: str = "box") -> dict:
    return {
        "id": "rect1",
        "original_width": WIDTH,
        "original_height": HEIGHT,
        "image_rotation": 0,
        "value": {"x": x, "y": y, "width": width, "height": height, "rotation": 0, "rectanglelabels": [label]},
        "from_name": from_name,
        "to_name": "image",
        "type": "rectanglelabels",
        "origin": "manual",
    }


def textarea(text: str) -> dict:
    return {
        "id": "txt1",
        "from_name": "prompt",
        "to_name": "image",
        "type": "textarea",
        "value": {"text": [text]},
        "origin": "manual",
    }


def interactive(client, context: dict | None, config: str = CONFIG, name: str = "a.png"):
    body = {
        "tasks": [task(name)],
        "project": "3.1764410400",
        "label_config": config,
        "params": {"login": None, "password": None, "context": context},
    }
    return client.post("/predict", json=body)


def decode(region: dict) -> np.ndarray:
    flat = decode_rle(region["value"]["rle"])
    return flat.reshape(region["original_height"], region["original_width"], 4)[:, :, 3] > 0


def only_region(reply) -> dict:
    assert reply.status_code == 200, reply.json
    results = reply.json["results"]
    assert len(results) == 1, "one prediction per interactive call"
    assert len(results[0]["result"]) == 1, results[0]
    region = results[0]["result"][0]
    assert region["from_name"] == "tag" and region["to_name"] == "image" and region["type"] == "brushlabels"
    assert (region["original_width"], region["original_height"]) == (WIDTH, HEIGHT)
    return region


def test_the_config_parses_smart_controls() -> None:
    schema = parse_label_config(CONFIG)
    assert [(s.from_name, s.kind) for s in schema.smart] == [("kp", "keypoint"), ("box", "box"), ("prompt", "text")]
    assert schema.output_for("image").from_name == "tag"
    assert schema.smart[0].labels == LABELS


def test_a_click_returns_a_brush_mask_under_it_with_the_click_label(client) -> None:
    reply = interactive(client, {"result": [keypoint(20.0, 50.0, "grass")]})
    region = only_region(reply)
    mask = decode(region)
    assert mask.shape == (HEIGHT, WIDTH) and mask[48, 32]
    assert region["value"]["brushlabels"] == ["Grass"]  # mapped to the output control's label by name
    assert "carried by the prompt" in region["meta"]["text"][0]
    predictor = client.application.config["MASKCLIP_PREDICTOR"]
    assert reply.json["results"][0]["model_version"] == predictor.maskclip_version(parse_label_config(CONFIG))


def test_a_negative_click_takes_its_location_out(client) -> None:
    positive = decode(only_region(interactive(client, {"result": [keypoint(20.0, 50.0)]})))
    assert positive[48, 32]
    others = np.argwhere(positive & (np.arange(WIDTH)[None, :] > 40))
    assert len(others), "the positive mask reaches beyond the clicked area"
    y, x = others[len(others) // 2]
    negative = keypoint(100 * (x + 0.5) / WIDTH, 100 * (y + 0.5) / HEIGHT, positive=False)
    reply = interactive(client, {"result": [keypoint(20.0, 50.0), negative]})
    mask = decode(only_region(reply))
    assert not mask[y, x] and mask[48, 32]
    assert mask.sum() < positive.sum()


def test_a_box_answers_inside_the_box(client) -> None:
    region = only_region(interactive(client, {"result": [rectangle(50.0, 10.0, 40.0, 50.0, "Sky")]}))
    mask = decode(region)
    x0, y0, x1, y1 = 80, 9.6, 144, 57.6
    assert mask.any()
    rows, cols = np.nonzero(mask)
    assert cols.min() >= x0 - 1 and cols.max() <= x1 and rows.min() >= y0 - 1 and rows.max() <= y1
    assert region["value"]["brushlabels"] == ["Sky"]


def test_a_phrase_naming_a_label_gets_that_label(client) -> None:
    region = only_region(interactive(client, {"result": [textarea("the brick walls on the left")]}))
    assert region["value"]["brushlabels"] == ["Wall"]  # named by a synonym, plural
    assert "named in the prompt" in region["meta"]["text"][0]
    assert decode(region).any()


def test_a_free_phrase_takes_the_label_selected_with_it_else_says_which_label_it_chose(client) -> None:
    selected = only_region(interactive(client, {"result": [textarea("shiny puddles"), keypoint(20, 50, "Sky")]}))
    assert selected["value"]["brushlabels"] == ["Sky"]
    assert "selected with the prompt" in selected["meta"]["text"][0]
    alone = only_region(interactive(client, {"result": [textarea("shiny puddles")]}))
    assert alone["value"]["brushlabels"][0] in LABELS
    assert "chosen by MaskCLIP" in alone["meta"]["text"][0]


def test_an_empty_context_gets_one_prediction_without_regions(client) -> None:
    for context in ({"result": []}, {"result": [textarea("   ")]}, {"result": [{"type": "choices", "value": {}}]}):
        reply = interactive(client, context)
        assert reply.status_code == 200
        assert len(reply.json["results"]) == 1 and reply.json["results"][0]["result"] == []


def test_plain_keypoints_and_boxes_are_annotations_not_prompts(client) -> None:
    config = CONFIG.replace(
        '<RectangleLabels name="box" toName="image" smart="true">', '<RectangleLabels name="box" toName="image">'
    )
    reply = interactive(client, {"result": [rectangle(50.0, 10.0, 40.0, 50.0)]}, config)
    assert reply.status_code == 200 and reply.json["results"][0]["result"] == []
    other = rectangle(50.0, 10.0, 40.0, 50.0, from_name="somewhere")
    assert interactive(client, {"result": [other]}).json["results"][0]["result"] == []


def test_bad_contexts_get_clear_errors(client) -> None:
    reply = interactive(client, {"result": "not a list"})
    assert reply.status_code == 400 and "context.result" in reply.json["error"]
    bad = keypoint(20, 50)
    bad["value"]["x"] = "left"
    reply = interactive(client, {"result": [bad]})
    assert reply.status_code == 400 and "value.x" in reply.json["error"]


def test_polygon_projects_get_polygons(client) -> None:
    reply = interactive(client, {"result": [rectangle(0.0, 0.0, 60.0, 100.0, "Wall")]}, POLYGON_CONFIG)
    assert reply.status_code == 200
    regions = reply.json["results"][0]["result"]
    assert regions and all(r["type"] == "polygonlabels" and r["from_name"] == "outline" for r in regions)
    assert all(r["value"]["polygonlabels"] == ["Wall"] for r in regions)


def test_opening_a_task_fills_the_feature_cache_so_the_first_click_reuses_it(client, predictor: Predictor) -> None:
    cache = predictor.interactive.cache
    cache.clear()
    reply = client.post("/predict", json={"tasks": [task("b.png", 8)], "project": "3", "label_config": CONFIG})
    assert reply.status_code == 200 and reply.json["results"][0]["result"]
    assert len(cache) == 1
    hits = cache.hits
    only_region(interactive(client, {"result": [keypoint(50.0, 50.0, "Wall")]}, name="b.png"))
    assert cache.hits == hits + 1 and len(cache) == 1
