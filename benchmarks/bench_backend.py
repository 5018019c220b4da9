"""Backend overhead: ``/predict`` over HTTP against the engine's own ``segment()`` on the same images.

The overhead is everything the backend adds around the engine: downloading the
image from the Label Studio host, decoding it, RLE-encoding the masks and the
JSON round trip. Random ViT-B-16 weights (timing does not depend on them);
images are 1-megapixel JPEGs served over HTTP on 127.0.0.1.

A second part starts ``maskclip-backend serve`` (what ``make run`` runs: the
gunicorn master, the serving process, an embedded Redis and worker) and
reports the memory of its process tree idle, then the first proposal for a
new 10-label project over HTTP with the text cache cold (``/setup`` as Label
Studio sends it on connecting, then ``/predict`` at once), then the memory
after that warm-up.

    .venv/bin/python benchmarks/bench_backend.py [--model ViT-B-16] [--repeats 3] [--no-serve]
"""

from __future__ import annotations

import argparse
import functools
import io
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import requests
from PIL import Image
from werkzeug.serving import make_server

from backend.app import create_app
from ls_integration.predictor import Predictor
from maskclip_engine import Segmenter
from maskclip_engine.images import decode_image
from maskclip_service.settings import Settings

LABELS = ["person", "car", "road", "building", "tree", "sky", "bicycle", "dog", "grass", "sidewalk"]
CONFIG = (
    '<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">'
    + "".join(f'<Label value="{label}"/>' for label in LABELS)
    + "</BrushLabels></View>"
)


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def photo(seed: int, width: int = 1280, height: int = 800) -> bytes:
    """A JPEG with smooth regions and texture, so masks have realistic run lengths."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (8, 12, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC)).astype(np.int16)
    image += rng.integers(-12, 12, image.shape, dtype=np.int16)
    buffer = io.BytesIO()
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def serve_backend(root: Path, files: list[bytes], model: str, device: str | None):
    """Serve ``files`` as ``img<i>.jpg`` from ``root`` and a backend with random ``model`` weights that fetches
    them; returns (image server, its URL, the backend's predictor, backend server, its URL)."""
    for i, data in enumerate(files):
        (root / f"img{i}.jpg").write_bytes(data)
    image_server, image_url = serve(functools.partial(_Quiet, directory=str(root)))
    settings = Settings(
        model=model,
        pretrained="random",
        device=device,
        cache_dir=root / "cache",
        label_studio_url=image_url,
        label_studio_api_key="benchmark",
    )
    predictor = Predictor(Segmenter.from_pretrained(model, "random", device, cache_dir=root / "cache"), settings)
    backend, backend_url = serve(create_app(settings, predictor))
    return image_server, image_url, predictor, backend, backend_url


def serve(app_or_handler, host: str = "127.0.0.1"):
    if isinstance(app_or_handler, functools.partial):
        server = ThreadingHTTPServer((host, 0), app_or_handler)
    else:
        server = make_server(host, 0, app_or_handler, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{host}:{server.server_port}"


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux /proc)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(child) for child in (task / "children").read_text().split()]
            except OSError:
                pass
    return found


def tree_memory_mb(pid: int) -> dict[str, float]:
    """RSS (shared pages counted in every process) and PSS (shared pages split) summed over the tree, in MB."""
    rss = pss = 0
    each = {}
    for member in process_tree(pid):
        try:
            rollup = Path(f"/proc/{member}/smaps_rollup").read_text().splitlines()
            name = Path(f"/proc/{member}/cmdline").read_text().replace("\0", " ")[:60]
        except OSError:
            continue
        fields = {line.split()[0].rstrip(":"): int(line.split()[1]) for line in rollup[1:] if len(line.split()) >= 2}
        rss += fields.get("Rss", 0)
        pss += fields.get("Pss", 0)
        each[f"{member:>7} {name}"] = fields.get("Rss", 0) / 1024
    return {"rss": rss / 1024, "pss": pss / 1024, "processes": each}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def bench_serve(model: str, device: str | None, settle_s: float = 20.0) -> None:
    """``maskclip-backend serve`` as ``make run`` starts it: idle memory, first proposal, memory after it."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "img0.jpg").write_bytes(photo(0))
        image_server, image_url = serve(functools.partial(_Quiet, directory=str(root)))
        port = _free_port()
        env = {
            **os.environ,
            "MASKCLIP_MODEL": model,
            "MASKCLIP_PRETRAINED": "random",
            "MASKCLIP_PORT": str(port),
            "MODEL_DIR": str(root / "models"),
            "MASKCLIP_CACHE_DIR": str(root / "cache"),  # cold: no text embedding computed before
            "LABEL_STUDIO_URL": image_url,
            "LABEL_STUDIO_API_KEY": "benchmark",
            "LOG_LEVEL": "WARNING",
        }
        env.pop("REDIS_URL", None)  # the embedded Redis and worker, as on one machine
        if device:
            env["MASKCLIP_DEVICE"] = device
        command = [str(Path(sys.executable).with_name("maskclip-backend")), "serve"]
        server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            started = time.perf_counter()
            while True:
                try:
                    if requests.get(f"{url}/health", timeout=10).ok:
                        break
                except requests.RequestException:  # not listening yet, or busy loading the model
                    pass
                if server.poll() is not None or time.perf_counter() - started > 600:
                    raise RuntimeError(f"maskclip-backend serve did not start: {server.stderr.read()[-2000:]}")
                time.sleep(0.5)
            ready_s = time.perf_counter() - started
            time.sleep(settle_s)  # the worker and Redis finish starting; nothing else happens
            idle = tree_memory_mb(server.pid)

            http = requests.Session()
            tasks = [{"id": 1, "data": {"image": f"{image_url}/img0.jpg"}}]
            start = time.perf_counter()
            http.post(f"{url}/setup", json={"project": "1", "schema": CONFIG}, timeout=600).raise_for_status()
            body = {"tasks": tasks, "project": "1", "label_config": CONFIG}
            reply = http.post(f"{url}/predict", json=body, timeout=600)
            reply.raise_for_status()
            assert reply.json()["results"][0], "the first proposal came back empty"
            first_s = time.perf_counter() - start
            start = time.perf_counter()
            http.post(f"{url}/predict", json=body, timeout=600).raise_for_status()
            second_s = time.perf_counter() - start
            warm = tree_memory_mb(server.pid)
        finally:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
            image_server.shutdown()

    print(f"\nmaskclip-backend serve ({model}, random weights): ready after {ready_s:.0f} s\n")
    print("moment                 | RSS sum MB | PSS sum MB")
    print("-----------------------|------------|-----------")
    print(f"idle                   | {idle['rss']:10.0f} | {idle['pss']:10.0f}")
    print(f"after first proposal   | {warm['rss']:10.0f} | {warm['pss']:10.0f}")
    print("\nprocesses, RSS MB (idle -> after first proposal):")
    for name, mb in idle["processes"].items():
        print(f"  {mb:6.0f} -> {warm['processes'].get(name, 0):6.0f}  {name}")
    print(
        f"\nfirst proposal of a new {len(LABELS)}-label project over HTTP (/setup then /predict, text cache cold): "
        f"{first_s:.1f} s; the next one: {second_s:.1f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-serve", action="store_true", help="Skip starting maskclip-backend serve.")
    parser.add_argument("--serve-only", action="store_true", help="Only the maskclip-backend serve part.")
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    if not args.no_serve:
        bench_serve(args.model, args.device)
    if args.serve_only:
        return

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        files = [photo(i) for i in range(8)]
        image_server, image_url, predictor, backend, backend_url = serve_backend(root, files, args.model, args.device)
        segmenter = predictor.segmenter
        http = requests.Session()

        def predict(count: int) -> None:
            tasks = [{"id": i, "data": {"image": f"{image_url}/img{i}.jpg"}} for i in range(count)]
            reply = http.post(f"{backend_url}/predict", json={"tasks": tasks, "label_config": CONFIG}, timeout=600)
            reply.raise_for_status()
            assert len(reply.json()["results"]) == count

        arrays = [decode_image(data) for data in files]

        def engine(count: int) -> None:
            segmenter.segment_batch(arrays[:count], LABELS)

        predict(1)  # warm-up: text cache, allocator
        rows = []
        for count in (1, 8):
            http_times, engine_times = [], []
            for _ in range(args.repeats):  # interleaved so both see the same machine load
                http_times.append(median_ms(lambda c=count: predict(c), 1))
                engine_times.append(median_ms(lambda c=count: engine(c), 1))
            http_ms, engine_ms = statistics.median(http_times), statistics.median(engine_times)
            rows.append((count, engine_ms, http_ms, (http_ms - engine_ms) / engine_ms))
        backend.shutdown()
        image_server.shutdown()

    print(
        f"model {args.model}, device {segmenter.clip.device}, {len(LABELS)} labels, 1280x800 JPEG tasks, "
        f"median of {args.repeats} interleaved runs\n"
    )
    print("tasks | engine segment ms | HTTP /predict ms | overhead")
    print("------|-------------------|------------------|---------")
    for count, engine_ms, http_ms, overhead in rows:
        print(f"{count:5d} | {engine_ms:17.0f} | {http_ms:16.0f} | {overhead:7.1%}")


if __name__ == "__main__":
    main()
