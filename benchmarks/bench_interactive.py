"""Smart-tool latency: interactive ``/predict`` calls over HTTP, against the engine's ``segment()``.

* First interaction on a new image (no cached state: fetch, decode, one forward
  pass, region, RLE) against ``segment()`` on the same decoded image; goal at
  most 1.2x.
* Later clicks, boxes and phrases on the same image, answered from the cached
  dense state, end to end through a real HTTP server on 127.0.0.1 (the image
  is fetched from a local file server each time, as from Label Studio); goal a
  median of at most 50 ms. A phrase seen for the first time also runs the text
  encoder over its 85 prompts; that row is reported apart.

Random ViT-B-16 weights (timing does not depend on them), short side 448.

    .venv/bin/python benchmarks/bench_interactive.py [--model ViT-B-16] [--repeats 20]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
from bench_backend import photo, serve_backend
from PIL import Image

from maskclip_engine.images import decode_image

LABELS = ["person", "car", "road", "building", "tree", "sky", "bicycle", "dog", "grass", "sidewalk"]
CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<KeyPointLabels name="kp" toName="image" smart="true">'
    + "".join(f'<Label value="{label}"/>' for label in LABELS)
    + '</KeyPointLabels><RectangleLabels name="box" toName="image" smart="true">'
    + "".join(f'<Label value="{label}"/>' for label in LABELS)
    + '</RectangleLabels><TextArea name="prompt" toName="image"/><BrushLabels name="tag" toName="image">'
    + "".join(f'<Label value="{label}"/>' for label in LABELS)
    + "</BrushLabels></View>"
)
WIDTH, HEIGHT = 672, 448


def click(rng: np.random.Generator, positive: bool = True) -> dict:
    return {
        "from_name": "kp",
        "to_name": "image",
        "type": "keypointlabels",
        "original_width": WIDTH,
        "original_height": HEIGHT,
        "image_rotation": 0,
        "is_positive": positive,
        "value": {"x": float(rng.uniform(5, 95)), "y": float(rng.uniform(5, 95)), "width": 0.5,
                  "keypointlabels": [str(rng.choice(LABELS))]},
    }  # fmt: skip


def box(rng: np.random.Generator) -> dict:
    x, y = rng.uniform(0, 60, 2)
    return {
        "from_name": "box",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": WIDTH,
        "original_height": HEIGHT,
        "image_rotation": 0,
        "value": {"x": float(x), "y": float(y), "width": 35.0, "height": 35.0, "rotation": 0,
                  "rectanglelabels": [str(rng.choice(LABELS))]},
    }  # fmt: skip


def phrase(text: str) -> dict:
    return {"from_name": "prompt", "to_name": "image", "type": "textarea", "value": {"text": [text]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    rng = np.random.default_rng(0)

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        files = [photo(i, WIDTH, HEIGHT) for i in range(args.images + 1)]
        image_server, image_url, predictor, backend, backend_url = serve_backend(root, files, args.model, args.device)
        segmenter = predictor.segmenter
        http = requests.Session()

        def interact(index: int, regions: list[dict]) -> dict:
            body = {
                "tasks": [{"id": index, "data": {"image": f"{image_url}/img{index}.jpg"}}],
                "project": "1",
                "label_config": CONFIG,
                "params": {"login": None, "password": None, "context": {"result": regions}},
            }
            reply = http.post(f"{backend_url}/predict", json=body, timeout=600)
            reply.raise_for_status()
            return reply.json()["results"][0]

        def timed(fn) -> float:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1000

        # Warm-up on an image of its own: allocator, label embeddings, one phrase's embedding.
        warm = args.images
        interact(warm, [click(rng)])
        interact(warm, [phrase("a warm-up phrase")])
        arrays = [np.asarray(Image.fromarray(decode_image(data))) for data in files]

        def in_thread(fn) -> None:
            # The server answers on its own threads; torch ran a forward pass measurably slower on this
            # process's main thread than on a fresh one (up to 1.4x here), so the engine runs on one too.
            worker = threading.Thread(target=fn)
            worker.start()
            worker.join()

        first, engine = [], []
        for index in range(args.images):  # interleaved so both see the same machine load
            engine.append(timed(lambda i=index: in_thread(lambda: segmenter.segment(arrays[i], LABELS))))
            first.append(timed(lambda i=index: interact(i, [click(rng)])))

        rows = []
        later = {
            "click": lambda: interact(0, [click(rng)]),
            "2 clicks + 1 negative": lambda: interact(0, [click(rng), click(rng), click(rng, positive=False)]),
            "box": lambda: interact(0, [box(rng)]),
            "phrase (embedding cached)": lambda: interact(0, [phrase("a red car on the left")]),
        }
        interact(0, [phrase("a red car on the left")])  # this phrase's embedding, once
        for name, fn in later.items():
            rows.append((name, [timed(fn) for _ in range(args.repeats)]))
        new_phrases = [timed(lambda k=k: interact(0, [phrase(f"puddles number {k}")])) for k in range(3)]
        hits, misses = predictor.interactive.cache.hits, predictor.interactive.cache.misses
        backend.shutdown()
        image_server.shutdown()

    print(
        f"model {args.model} (random weights), device {segmenter.clip.device}, short side 448, "
        f"{WIDTH}x{HEIGHT} JPEG fetched over HTTP per call, {len(LABELS)} labels; feature cache hits {hits}, "
        f"misses {misses}\n"
    )
    print("first interaction on a new image | segment() ms | interaction ms | ratio (goal <= 1.2)")
    print("---------------------------------|--------------|----------------|-------------------")
    for index, (e, f) in enumerate(zip(engine, first)):
        print(f"image {index:<26d} | {e:12.0f} | {f:14.0f} | {f / e:5.2f}")
    e, f = statistics.median(engine), statistics.median(first)
    print(f"{'median':<32} | {e:12.0f} | {f:14.0f} | {f / e:5.2f}\n")
    print(f"later gestures on the same image, {args.repeats} each | median ms (goal <= 50) | p90 ms")
    print("----------------------------------------------|------------------------|-------")
    for name, times in rows:
        p90 = float(np.percentile(times, 90))
        print(f"{name:<45} | {statistics.median(times):22.1f} | {p90:6.1f}")
    print(f"{'new phrase (85 prompts through the text tower)':<45} | {statistics.median(new_phrases):22.1f} | -")


if __name__ == "__main__":
    main()
