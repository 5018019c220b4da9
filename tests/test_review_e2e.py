"""Annotation review end to end: a real Label Studio project with a few wrong annotations, `maskclip review`,
the page the backend serves, opened in a real browser."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner
from PIL import Image

from maskclip_engine.cli.main import main
from tests.browser import Browser, find_chromium
from tests.label_studio_server import Backend, LabelStudio, brush_config, brush_results
from tests.scenes import CLASSES, make_scene
from tests.test_label_studio_e2e import backend_env
from tests.test_review import inject

WRONG = {2: "swap", 5: "missing", 9: "swap", 13: "missing"}  # task positions -> injected error


@pytest.fixture(scope="module")
def env(label_studio: LabelStudio, documents: Path, tiny_vit, tmp_path_factory) -> dict[str, str]:
    return backend_env(
        tiny_vit,
        label_studio,
        documents,
        tmp_path_factory.mktemp("review-cache"),
        MODEL_DIR=str(tmp_path_factory.mktemp("review-models")),
        MASKCLIP_SHORT_SIDE="128",
        MASKCLIP_TRAIN_ITERATIONS="400",  # the fold students train on half of it
        MASKCLIP_TRAIN_CROP="128",
        MASKCLIP_TRAIN_LR="0.05",
        MASKCLIP_PRECISION="fp32",
        REDIS_URL="",
    )


@pytest.fixture(scope="module")
def project(label_studio: LabelStudio, documents: Path) -> tuple[int, list[int]]:
    folder = documents / "review"
    folder.mkdir(exist_ok=True)
    labels = {}
    for i in range(24):
        image, truth = make_scene(300 + i)
        Image.fromarray(image).save(folder / f"{i}.png")
        labels[i] = inject(truth, WRONG[i])[0] if i in WRONG else truth
    pid = label_studio.api("POST", "/api/projects", json={"title": "review", "label_config": brush_config(CLASSES)})
    pid = pid.json()["id"]
    label_studio.api(
        "POST",
        f"/api/projects/{pid}/import",
        json=[{"image": f"/data/local-files/?d=review/{i}.png"} for i in range(24)],
    )
    tasks = sorted(
        label_studio.api("GET", "/api/tasks", params={"project": pid, "page_size": 100}).json()["tasks"],
        key=lambda t: t["id"],
    )
    for position, task in enumerate(tasks):
        label_studio.api(
            "POST", f"/api/tasks/{task['id']}/annotations", json={"result": brush_results(labels[position], CLASSES)}
        )
    return pid, [task["id"] for task in tasks]


def test_maskclip_review_ranks_the_wrong_annotations_first_and_the_backend_shows_them(
    env, project, monkeypatch, tmp_path: Path, tmp_path_factory
) -> None:
    pid, tasks = project
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "review"
    result = CliRunner().invoke(main, ["review", "--project", str(pid), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "24 annotations reviewed" in result.output
    document = json.loads((out / "review.json").read_text())
    ranked = [row["task"] for row in document["annotations"]]
    wrong = {tasks[position] for position in WRONG}
    assert wrong <= set(ranked[:5]), (ranked[:8], wrong)
    first = document["annotations"][0]
    assert {"task", "annotation", "score", "labels"} <= set(first) and first["score"] < document["flag_below"]
    assert first["link"] == f"{env['LABEL_STUDIO_URL']}/projects/{pid}/data?task={first['task']}"

    # The review is kept in the project's folder, and the backend serves the latest one.
    backend = Backend(env, tmp_path_factory.mktemp("review-backend") / "backend.log")
    try:
        page = requests.get(f"{backend.url}/review/{pid}", timeout=30)
        assert page.status_code == 200 and "Annotation review" in page.text
        assert requests.get(f"{backend.url}/review/999", timeout=30).status_code == 404
        assert requests.get(f"{backend.url}/review/{pid}/../../link.json", timeout=30).status_code == 404
        if find_chromium() is None and not os.environ.get("CI"):
            pytest.skip("chromium is not installed: `make test` installs it")
        with Browser(backend.url, tmp_path / "shots") as browser:
            browser.driver.get(f"{backend.url}/review/{pid}")
            images = browser.wait_for(
                lambda: browser.js(
                    "const all = [...document.images];"
                    "return all.length && all.every(i => i.complete && i.naturalWidth > 0) ? all.length : 0;"
                ),
                "the review's pictures to load",
            )
            assert images == min(50, len(ranked))
            docs = os.environ.get("REVIEW_DOCS_IMAGE")
            if docs:  # the picture docs/review.md shows
                browser.driver.set_window_size(1280, 1000)
                browser.screenshot("review-page")
                Image.open(tmp_path / "shots" / "review-page.png").save(docs)
    finally:
        backend.stop()
