"""End to end with the real Label Studio server: connect, predict, read predictions back."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image

from ls_integration.auth import LabelStudioAuth
from ls_integration.fetching import ImageFetcher
from maskclip_service.settings import Settings
from tests.conftest import scene
from tests.label_studio_server import TOKEN, Backend, LabelStudio, scene_project

LABELS = ("Wall", "Grass", "Sky")
CONFIG = f"""<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image">
    {"".join(f'<Label value="{label}"/>' for label in LABELS)}
  </BrushLabels>
</View>"""


@pytest.fixture(scope="module", autouse=True)
def photos(documents: Path) -> None:
    (documents / "photos").mkdir(exist_ok=True)
    Image.fromarray(scene(96, 160, seed=11)).save(documents / "photos" / "one.png")
    Image.fromarray(scene(120, 90, seed=12)).save(documents / "photos" / "two.jpg")


def backend_env(tiny, label_studio: LabelStudio, documents: Path, cache: Path, **extra: str) -> dict[str, str]:
    """The environment a user gives `maskclip-backend serve`, with the tiny test model."""
    return {
        "MASKCLIP_MODEL": str(tiny.config),
        "MASKCLIP_PRETRAINED": str(tiny.state_dict),
        "MASKCLIP_DEVICE": "cpu",
        "MASKCLIP_CACHE_DIR": str(cache),
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": TOKEN,
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(documents),
        "HF_HUB_OFFLINE": "1",
        **extra,
    }


@pytest.fixture(scope="module")
def backend(label_studio: LabelStudio, documents: Path, tiny_vit, tmp_path_factory: pytest.TempPathFactory):
    env = backend_env(tiny_vit, label_studio, documents, tmp_path_factory.mktemp("cache"), MASKCLIP_SHORT_SIDE="64")
    server = Backend(env, tmp_path_factory.mktemp("backend") / "backend.log")
    yield server
    server.stop()


def test_predictions_through_label_studio(label_studio: LabelStudio, backend: Backend) -> None:
    project = label_studio.api("POST", "/api/projects", json={"title": "MaskCLIP e2e", "label_config": CONFIG}).json()
    pid = project["id"]
    label_studio.api(
        "POST",
        f"/api/projects/{pid}/import",
        json=[{"image": "/data/local-files/?d=photos/one.png"}, {"image": "/data/local-files/?d=photos/two.jpg"}],
    )
    upload = io.BytesIO()
    Image.fromarray(scene(80, 100, seed=13)).save(upload, format="PNG")
    label_studio.api("POST", f"/api/projects/{pid}/import", files={"file": ("three.png", upload.getvalue())})
    tasks = label_studio.api("GET", "/api/tasks", params={"project": pid, "page_size": 100}).json()["tasks"]
    assert len(tasks) == 3

    ml = label_studio.api(
        "POST", "/api/ml", json={"url": backend.url, "project": pid, "title": "MaskCLIP", "is_interactive": False}
    ).json()
    health = label_studio.api("GET", f"/api/ml/{ml['id']}").json()
    assert health["state"] == "CO", health  # connected: Label Studio ran /health and /setup
    version = health["model_version"]
    assert version.startswith("maskclip-tiny-vit-")

    label_studio.api(
        "POST",
        "/api/dm/actions",
        params={"id": "retrieve_tasks_predictions", "project": pid},
        json={"selectedItems": {"all": False, "included": [t["id"] for t in tasks]}},
    )

    sizes = {"one.png": (160, 96), "two.jpg": (90, 120), "three.png": (100, 80)}
    for task in tasks:
        predictions = label_studio.api("GET", "/api/predictions", params={"task": task["id"]}).json()
        assert len(predictions) == 1, f"task {task['id']} has {len(predictions)} predictions"
        prediction = predictions[0]
        assert prediction["model_version"] == version
        name = next(n for n in sizes if task["data"]["image"].endswith(n))
        width, height = sizes[name]
        assert prediction["result"], f"{name} got no regions"
        for region in prediction["result"]:
            assert region["type"] == "brushlabels"
            assert region["value"]["brushlabels"][0] in LABELS
            assert (region["original_width"], region["original_height"]) == (width, height)
            mask = np.asarray(decode_rle(region["value"]["rle"])).reshape(height, width, 4)[:, :, 3]
            assert mask.shape == (height, width) and mask.any()

    versions = label_studio.api("GET", f"/api/ml/{ml['id']}/versions").json()
    assert version in versions["versions"]


def test_personal_access_tokens_fetch_uploaded_images(label_studio: LabelStudio) -> None:
    project = label_studio.api("POST", "/api/projects", json={"title": "PAT", "label_config": CONFIG}).json()
    upload = io.BytesIO()
    Image.fromarray(scene(50, 70, seed=14)).save(upload, format="PNG")
    label_studio.api("POST", f"/api/projects/{project['id']}/import", files={"file": ("pat.png", upload.getvalue())})
    task = label_studio.api("GET", "/api/tasks", params={"project": project["id"]}).json()["tasks"][0]

    personal = label_studio.api("POST", "/api/token/").json()["token"]
    auth = LabelStudioAuth(label_studio.url, personal)
    assert auth.personal_token
    settings = Settings(label_studio_url=label_studio.url, label_studio_api_key=personal)
    image = ImageFetcher(settings, auth).fetch(task["data"]["image"], task["id"])
    assert image.shape == (50, 70, 3)
    legacy = ImageFetcher(settings, LabelStudioAuth(label_studio.url, TOKEN)).fetch(task["data"]["image"])
    np.testing.assert_array_equal(image, legacy)


def test_start_training_in_label_studio_then_predictions_come_from_the_student(
    label_studio: LabelStudio, documents: Path, tiny_vit, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Annotate, press Start Training (through the API), let the backend's own worker train, predict again."""
    project, tasks = scene_project(label_studio, documents, "e2e training", annotated=8, plain=2)
    env = backend_env(
        tiny_vit,
        label_studio,
        documents,
        tmp_path_factory.mktemp("train-cache"),
        MASKCLIP_SHORT_SIDE="256",
        MASKCLIP_TRAIN_ITERATIONS="200",
        MASKCLIP_TRAIN_CROP="256",
        MASKCLIP_TRAIN_LR="0.05",
        MODEL_DIR=str(tmp_path_factory.mktemp("e2e-models")),
        REDIS_URL="",  # no queue given: `serve` runs its own Redis and worker
    )
    backend = Backend(env, tmp_path_factory.mktemp("train-backend") / "backend.log")
    try:
        ml = label_studio.api("POST", "/api/ml", json={"url": backend.url, "project": project, "title": "MaskCLIP"})
        ml_id = ml.json()["id"]
        label_studio.api("POST", f"/api/ml/{ml_id}/train")

        student = f"student-p{project}-v1"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            details = requests.get(f"{backend.url}/versions", json={"project": f"{project}.1"}, timeout=10).json()
            if any(d["version"] == student and d.get("active") for d in details["details"]):
                break
            assert backend.process.poll() is None, backend.log.read_text()[-3000:]
            time.sleep(1)
        else:
            pytest.fail(f"no promoted student within 300 s:\n{backend.log.read_text()[-3000:]}")

        label_studio.api(
            "POST",
            "/api/dm/actions",
            params={"id": "retrieve_tasks_predictions", "project": project},
            json={"selectedItems": {"all": False, "included": [t["id"] for t in tasks]}},
        )
        for task in tasks:
            predictions = label_studio.api("GET", "/api/predictions", params={"task": task["id"]}).json()
            versions = {p["model_version"] for p in predictions}
            assert student in versions, f"task {task['id']} has predictions from {versions}"
        listed = label_studio.api("GET", f"/api/ml/{ml_id}/versions").json()["versions"]
        assert student in listed
    finally:
        backend.stop()
