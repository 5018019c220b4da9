"""Start Training on a small project through a real Label Studio, against the project's first pass.

What a team starting a project waits for, on one machine in one run: ``maskclip-backend serve``
(what ``make run`` starts: the HTTP backend, an embedded Redis and one worker) connected to a
Label Studio 1.23.2 project of ``--tasks`` generated 512x512 scenes (random ViT-B-16 weights:
timing does not depend on them; the student learns the scenes from their annotations):

0. a warm-up project of two tasks (the worker loads the model on its first job), whose first pass
   is shown, cold;
1. the first pass: from importing the tasks into the connected project until every task holds
   its proposal (the worker's pre-annotation on import: fetching, the backbone, the feature
   store, RLE encoding, the import into Label Studio);
2. an annotator submits every task's annotation (the scenes' ground truth);
3. Start Training, as the button in *Settings > Model* sends it (``POST /api/ml/ID/train``):
   from the press until the new student is the active model (downloading the annotations,
   reading the stored features, training, the promotion gate on the held-out fifth, saving and
   activating; until the student is listed, which it is once the gate has judged it).

Goal (issue "a project of 100,000 images"): Start Training at most 2x the first pass on 10 tasks.
Between projects (``--repeats``) the script waits for the worker to finish what training queued
after it (the annotation review, pre-annotation with the student), so each first pass starts on
an idle worker.

    .venv/bin/python benchmarks/bench_start_training.py [--tasks 10] [--repeats 1]

Needs Label Studio 1.23.2 in .venv-label-studio (``make label-studio``).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import zlib
from pathlib import Path

import requests
from PIL import Image
from redis import Redis
from rq import Queue
from rq.registry import StartedJobRegistry

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from maskclip_service.defaults import QUEUE_NAME  # noqa: E402
from tests.label_studio_server import TOKEN, Backend, LabelStudio, brush_config, brush_results  # noqa: E402
from tests.scenes import CLASSES, make_scene  # noqa: E402

MODEL = "ViT-B-16"
SIZE = 512
LIMIT_S = 1800  # a bound on every wait: a run that takes longer than this is broken, not slow


def wait_for(what: str, done, backend: Backend) -> float:
    """Seconds until ``done()`` is true, polled every 0.2 s; fails if the backend dies or time runs out."""
    began = time.perf_counter()
    while not done():
        if backend.process.poll() is not None:
            raise SystemExit(f"the backend stopped while waiting for {what}; see {backend.log}")
        if time.perf_counter() - began > LIMIT_S:
            raise SystemExit(f"{what} did not happen within {LIMIT_S} s; see {backend.log}")
        time.sleep(0.2)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10, help="tasks of the project, all annotated before training")
    parser.add_argument("--repeats", type=int, default=1, help="projects, one after another, on the same servers")
    parser.add_argument("--keep", action="store_true", help="keep the servers' folders and logs")
    args = parser.parse_args()
    if args.tasks < 2:
        parser.error("--tasks must be at least 2: the gate holds a fifth out, at least one")

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-start-training-") as tmp:
        root = Path(tmp)
        if args.keep:
            root = Path(tempfile.mkdtemp(prefix="bench-start-training-"))
            print(f"servers' folders and logs kept in {root}")
        documents = root / "documents"
        documents.mkdir()
        label_studio = LabelStudio(root / "ls", documents)
        env = {
            "MASKCLIP_MODEL": MODEL,
            "MASKCLIP_PRETRAINED": "random",
            "MASKCLIP_DEVICE": "cpu",
            "MASKCLIP_CACHE_DIR": str(root / "cache"),
            "MODEL_DIR": str(root / "models"),
            "LABEL_STUDIO_URL": label_studio.url,
            "LABEL_STUDIO_API_KEY": TOKEN,
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(documents),
            "HF_HUB_OFFLINE": "1",
            "REDIS_URL": "",  # `serve` runs its own Redis and worker, as `make run` does
        }
        try:
            backend = Backend(env, root / "backend.log")
        except BaseException:
            label_studio.stop()
            raise
        print(
            f"{MODEL} (random weights), {args.tasks} scenes {SIZE}x{SIZE}, {len(CLASSES)} labels, default short "
            f"side and training recipe, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()})",
            flush=True,
        )
        try:
            queue = Redis(unix_socket_path=str(root / "models" / ".queue" / "redis.sock"))
            cold, _ = one_project(label_studio, backend, documents, "warm-up", 2, train=False)
            print(f"warm-up project, 2 tasks: first pass {cold:.1f} s with the model loaded on the way", flush=True)
            for repeat in range(args.repeats):
                wait_for("an idle worker", lambda: idle(queue), backend)
                rows.append(one_project(label_studio, backend, documents, f"project{repeat}", args.tasks))
                print(f"project {repeat + 1}: {rows[-1]}", flush=True)
        finally:
            backend.stop()
            label_studio.stop()

    print()
    print("| project | first pass, s | Start Training to an active student, s | x first pass |")
    print("|--------:|--------------:|---------------------------------------:|-------------:|")
    for number, (first, training) in enumerate(rows, 1):
        print(f"| {number} | {first:.1f} | {training:.1f} | {training / first:.2f} |")


def idle(connection: Redis) -> bool:
    """Nothing queued or running on the backend's queue."""
    return (
        Queue(QUEUE_NAME, connection=connection).count == 0
        and StartedJobRegistry(QUEUE_NAME, connection=connection).count == 0
    )


def one_project(
    label_studio: LabelStudio, backend: Backend, documents: Path, name: str, count: int, train: bool = True
) -> tuple[float, float | None]:
    """``(first pass s, Start Training s)`` for a new project of ``count`` scenes (``None``: not trained)."""
    folder = documents / name
    folder.mkdir(parents=True)
    scenes = {}
    for i in range(count):
        image, labels = make_scene(5000 + zlib.crc32(name.encode()) % 10_000 + i, SIZE, SIZE)
        Image.fromarray(image).save(folder / f"{i}.png")
        scenes[f"{folder.name}/{i}.png"] = labels
    body = {"title": name, "label_config": brush_config(list(CLASSES))}
    project = label_studio.api("POST", "/api/projects", json=body).json()["id"]
    ml = label_studio.api("POST", "/api/ml", json={"url": backend.url, "project": project, "title": "MaskCLIP"})
    ml_id = ml.json()["id"]

    def tasks() -> list[dict]:
        reply = label_studio.api("GET", "/api/tasks", params={"project": project, "page_size": 1000, "fields": "all"})
        return reply.json()["tasks"]

    began = time.perf_counter()
    label_studio.api(
        "POST", f"/api/projects/{project}/import", json=[{"image": f"/data/local-files/?d={n}"} for n in scenes]
    )
    first = time.perf_counter() - began
    listed = []

    def all_predicted() -> bool:
        listed[:] = tasks()
        return len(listed) == count and all(task.get("predictions") for task in listed)

    first += wait_for("the first pass", all_predicted, backend)
    if not train:
        return first, None

    for task in listed:
        labels = scenes[task["data"]["image"].split("?d=", 1)[1]]
        label_studio.api(
            "POST", f"/api/tasks/{task['id']}/annotations", json={"result": brush_results(labels, list(CLASSES))}
        )

    student = f"student-p{project}-v1"

    def student_version() -> dict | None:
        reply = requests.get(f"{backend.url}/versions", json={"project": f"{project}.{ml_id}"}, timeout=30).json()
        return next((d for d in reply["details"] if d["version"] == student), None)

    began = time.perf_counter()
    label_studio.api("POST", f"/api/ml/{ml_id}/train")
    # The registry holds a student once the gate has judged it; a promoted one is activated right after.
    training = time.perf_counter() - began + wait_for("a trained student", student_version, backend)
    settle = time.monotonic() + 10
    while not (student_version() or {}).get("active") and time.monotonic() < settle:
        time.sleep(0.2)
    if not (student_version() or {}).get("active"):
        raise SystemExit(f"{student} was trained but the gate did not promote it; see {backend.log}")
    return first, training


if __name__ == "__main__":
    main()
