"""Backend overhead: ``/predict`` over HTTP against the engine's own ``segment()`` on the same images.

The overhead is everything the backend adds around the engine: downloading the
image from the Label Studio host, decoding it, RLE-encoding the masks and the
JSON round trip. Random ViT-B-16 weights (timing does not depend on them);
images are 1-megapixel JPEGs served over HTTP on 127.0.0.1.

    .venv/bin/python benchmarks/bench_backend.py [--model ViT-B-16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import io
import logging
import statistics
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
from ls_integration.settings import Settings
from maskclip_engine import Segmenter
from maskclip_engine.images import decode_image

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        files = [photo(i) for i in range(8)]
        for i, data in enumerate(files):
            (root / f"img{i}.jpg").write_bytes(data)
        image_server, image_url = serve(functools.partial(_Quiet, directory=str(root)))

        settings = Settings(
            model=args.model,
            pretrained="random",
            device=args.device,
            cache_dir=root / "cache",
            label_studio_url=image_url,
            label_studio_api_key="benchmark",
        )
        segmenter = Segmenter.from_pretrained(args.model, "random", args.device, cache_dir=root / "cache")
        predictor = Predictor(segmenter, settings)
        backend, backend_url = serve(create_app(settings, predictor))
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
