"""Smart tools end to end: the real Label Studio 1.23.2 asks the backend for interactive pre-annotations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from tests.conftest import scene
from tests.label_studio_server import Backend, LabelStudio
from tests.test_label_studio_e2e import backend_env

LABELS = ("Wall", "Grass", "Sky")
CONFIG = f"""<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image" smart="true">
    {"".join(f'<Label value="{label}" smart="true"/>' for label in LABELS)}
  </KeyPointLabels>
  <TextArea name="prompt" toName="image" editable="true" rows="1" maxSubmissions="1" showSubmitButton="true"/>
  <BrushLabels name="tag" toName="image">
    {"".join(f'<Label value="{label}"/>' for label in LABELS)}
  </BrushLabels>
</View>"""
WIDTH, HEIGHT = 150, 100


@pytest.fixture(scope="module")
def interactive_backend(label_studio: LabelStudio, documents: Path, tiny_vit, tmp_path_factory: pytest.TempPathFactory):
    env = backend_env(
        tiny_vit,
        label_studio,
        documents,
        tmp_path_factory.mktemp("smart-cache"),
        MASKCLIP_SHORT_SIDE="64",
        MODEL_DIR=str(tmp_path_factory.mktemp("smart-models")),
    )
    server = Backend(env, tmp_path_factory.mktemp("smart-backend") / "backend.log")
    yield server
    server.stop()


def brush_masks(reply: dict) -> list[tuple[str, np.ndarray]]:
    assert "errors" not in reply, reply
    regions = reply["data"]["result"]
    masks = []
    for region in regions:
        assert region["type"] == "brushlabels" and region["from_name"] == "tag" and region["to_name"] == "image"
        assert (region["original_width"], region["original_height"]) == (WIDTH, HEIGHT)
        flat = np.asarray(decode_rle(region["value"]["rle"]))
        assert flat.size == WIDTH * HEIGHT * 4, "the RLE does not decode to the image size"
        masks.append((region["value"]["brushlabels"][0], flat.reshape(HEIGHT, WIDTH, 4)[:, :, 3] > 0))
    return masks


def test_clicks_and_phrases_through_label_studio(
    label_studio: LabelStudio, interactive_backend: Backend, documents: Path
) -> None:
    (documents / "smart").mkdir(exist_ok=True)
    Image.fromarray(scene(HEIGHT, WIDTH, seed=21)).save(documents / "smart" / "street.png")
    project = label_studio.api("POST", "/api/projects", json={"title": "Smart tools", "label_config": CONFIG}).json()
    pid = project["id"]
    label_studio.api("POST", f"/api/projects/{pid}/import", json=[{"image": "/data/local-files/?d=smart/street.png"}])
    task = label_studio.api("GET", "/api/tasks", params={"project": pid}).json()["tasks"][0]
    ml = label_studio.api(
        "POST",
        "/api/ml",
        json={"url": interactive_backend.url, "project": pid, "title": "MaskCLIP smart", "is_interactive": True},
    ).json()
    assert label_studio.api("GET", f"/api/ml/{ml['id']}").json()["state"] == "CO"

    click = {
        "original_width": WIDTH,
        "original_height": HEIGHT,
        "image_rotation": 0,
        "value": {"x": 20.0, "y": 50.0, "width": 0.6, "keypointlabels": ["Grass"]},
        "is_positive": True,
        "id": "k1",
        "from_name": "kp",
        "to_name": "image",
        "type": "keypointlabels",
        "origin": "manual",
    }
    reply = label_studio.api(
        "POST", f"/api/ml/{ml['id']}/interactive-annotating", json={"task": task["id"], "context": {"result": [click]}}
    ).json()
    masks = brush_masks(reply)
    assert len(masks) == 1
    label, mask = masks[0]
    assert label == "Grass" and mask[50, 30], "the mask covers the clicked pixel"

    phrase = {
        "id": "t1",
        "from_name": "prompt",
        "to_name": "image",
        "type": "textarea",
        "value": {"text": ["the sky above the street"]},
        "origin": "manual",
    }
    reply = label_studio.api(
        "POST", f"/api/ml/{ml['id']}/interactive-annotating", json={"task": task["id"], "context": {"result": [phrase]}}
    ).json()
    masks = brush_masks(reply)
    assert len(masks) == 1 and masks[0][0] == "Sky" and masks[0][1].any()

    # Interactive suggestions are not stored as predictions.
    assert label_studio.api("GET", "/api/predictions", params={"task": task["id"]}).json() == []
