"""The project page end to end: the real Label Studio 1.23.2 pre-annotates through a real backend, Redis and
worker; annotators copy two proposals and repaint two; Label Studio's ANNOTATION_CREATED webhooks queue the
comparisons; the status JSON and the page (in headless Chromium) show it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from click.testing import CliRunner
from PIL import Image
from rq import Queue

from ls_integration.label_config import parse_label_config
from ls_integration.training_data import label_map
from maskclip_engine.cli.main import main
from maskclip_service.job_paths import COMPARE_ANNOTATION
from tests.browser import Browser, find_chromium
from tests.label_studio_server import Backend, LabelStudio, brush_config, brush_results, project_version
from tests.scenes import CLASSES
from tests.test_preannotate_e2e import (  # noqa: F401  (fixtures)
    QUEUE,
    SIDE,
    backend,
    drain,
    env,
    import_images,
    make_images,
    new_project,
    redis_server,
    worker_env,
)

CONTROL = parse_label_config(brush_config(CLASSES)).controls[0]


def repainted(proposal: dict) -> list[dict]:
    """Every pixel given another label than the proposal's: what an annotator who redid the task submits."""
    height = int(proposal["result"][0]["original_height"]) if proposal["result"] else SIDE
    width = int(proposal["result"][0]["original_width"]) if proposal["result"] else SIDE
    proposed = label_map(proposal, CONTROL, height, width)
    return brush_results(np.where(proposed < 0, 0, (proposed + 1) % len(CLASSES)), CLASSES)


def compare_jobs(redis) -> int:
    return sum(job.func_name == COMPARE_ANNOTATION for job in Queue(QUEUE, connection=redis).jobs)


def test_the_status_shows_the_run_the_model_and_how_much_annotators_changed(
    label_studio: LabelStudio,
    backend: Backend,  # noqa: F811
    env,  # noqa: F811
    redis_server,  # noqa: F811
    documents: Path,
    tmp_path: Path,
) -> None:
    redis_server.flushall()
    project = new_project(label_studio, "project page")
    label_studio.api("POST", "/api/ml", json={"url": backend.url, "project": project, "title": "MaskCLIP"})
    version = project_version(backend.url, project)
    tasks = import_images(label_studio, project, make_images(documents, "project-page", 8))
    drain(redis_server)  # the TASKS_CREATED run

    proposals = {}
    for task in tasks[:4]:
        [proposals[task["id"]]] = label_studio.api("GET", "/api/predictions", params={"task": task["id"]}).json()
    copies, repaints = [t["id"] for t in tasks[:2]], [t["id"] for t in tasks[2:4]]
    started = time.perf_counter()
    for task in copies:
        label_studio.api("POST", f"/api/tasks/{task}/annotations", json={"result": proposals[task]["result"]})
    for task in repaints:
        label_studio.api("POST", f"/api/tasks/{task}/annotations", json={"result": repainted(proposals[task])})
    deadline = time.monotonic() + 30  # Label Studio posts its webhooks beside the request, not inside it
    while compare_jobs(redis_server) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert compare_jobs(redis_server) == 4, open(backend.log).read()[-3000:]
    print(f"4 annotations posted and their comparisons queued in {time.perf_counter() - started:.2f} s")
    drain(redis_server)

    status = requests.get(f"{backend.url}/projects/{project}/status", timeout=30).json()
    [run] = status["runs"]
    assert (run["state"], run["done"], run["total"], run["predicted"], run["failed"]) == ("finished", 8, 8, 8, 0)
    [maskclip] = status["versions"]
    assert maskclip["name"] == version and maskclip["active"] and maskclip["model"] == "maskclip"
    [agreement] = status["agreement"]
    assert agreement["version"] == version and agreement["annotations"] == 4
    by_task = {point["task"]: point["iou"] for point in status["agreement_points"]}
    assert [by_task[t] for t in copies] == [1.0, 1.0]
    assert all(by_task[t] < 0.2 for t in repaints), by_task
    assert status["link"]["status"] == "linked"

    # On demand, for the existing annotations: the same records, one per annotation (none doubled).
    result = CliRunner().invoke(main, ["agreement", "--project", str(project)])
    assert result.exit_code == 0, result.output
    assert "4 annotations compared, 0 skipped" in result.output
    again = requests.get(f"{backend.url}/projects/{project}/status", timeout=30).json()
    assert again["agreement"][0]["annotations"] == 4 and again["agreement"][0]["mean_iou"] == agreement["mean_iou"]
    metrics = requests.get(f"{backend.url}/metrics", timeout=30).text
    assert f'maskclip_annotation_agreement_iou_count{{project="{project}",version="{version}"}} 4.0' in metrics
    assert requests.get(f"{backend.url}/projects/987654/status", timeout=30).status_code == 404

    if find_chromium() is None and not os.environ.get("CI"):
        pytest.skip("chromium is not installed: `make test` installs it")
    with Browser(backend.url, tmp_path / "shots", width=1100, height=1250) as browser:
        browser.driver.get(f"{backend.url}/projects/{project}/")
        points = browser.wait_for(
            lambda: browser.js("return document.querySelectorAll('#agreement-plot circle.point').length"),
            "the agreement plot",
        )
        assert points == 4
        box = browser.js("const r = document.getElementById('agreement-plot').getBoundingClientRect(); return r.width")
        assert box > 300  # drawn, not collapsed
        shot = browser.screenshot("project-page")
        docs = os.environ.get("PROJECT_PAGE_DOCS_IMAGE")
        if docs:  # the picture docs/project-page.md shows
            Image.open(shot).save(docs)
