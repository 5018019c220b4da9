"""Engine speed: ``segment()`` against a bare ``encode_image`` on the same input.

Random weights are used (timing does not depend on them), so this runs with no
download. Runs are interleaved so both sides see the same machine load.

    .venv/bin/python benchmarks/bench_engine.py [--models ViT-B-16,RN50] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet

from maskclip_engine import Segmenter
from maskclip_engine.dense import interpolate_positional_embedding
from maskclip_engine.images import resized_shape
from maskclip_engine.text import TextEmbedder

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
            with torch.inference_mode():
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


def bench_modes(model: str, image: np.ndarray, short_side: int, repeats: int, device: str | None) -> list[tuple]:
    """segment() time of each dense mode, interleaved, relative to MaskCLIP's."""
    modes = ("maskclip", "sclip", "clearclip", "naclip")
    with tempfile.TemporaryDirectory() as cache:
        segmenter = Segmenter.from_pretrained(model, pretrained=None, device=device, cache_dir=cache)
        for mode in modes:  # warm-up: text cache, kernels
            segmenter.segment(image, LABELS, short_side=short_side, dense_mode=mode)
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        for _ in range(repeats):
            for mode in modes:
                times[mode] += timed(
                    lambda m=mode: segmenter.segment(image, LABELS, short_side=short_side, dense_mode=m), 1
                )
    base = statistics.median(times["maskclip"])
    return [(mode, statistics.median(t) * 1000, statistics.median(t) / base) for mode, t in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="ViT-B-16,RN50")
    parser.add_argument("--short-side", type=int, default=448)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (480, 720, 3), dtype=np.uint8)  # a 3:2 photo, resized like a real one
    rows = [bench(m, image, args.short_side, args.repeats, args.device) for m in args.models.split(",")]

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"device: {device}, torch threads: {torch.get_num_threads()}, labels: {len(LABELS)}, "
        f"median of {args.repeats} interleaved runs\n"
    )
    headers = list(rows[0])
    widths = [max(len(h), *(len(_fmt(r[h])) for r in rows)) for h in headers]
    print(" | ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(_fmt(row[h]).ljust(w) for h, w in zip(headers, widths)))

    vit = next((m for m in args.models.split(",") if m.startswith("ViT")), None)
    if vit:
        print(f"\ndense modes, {vit}, segment() with KS and PD on\n")
        print("mode      | segment ms | vs maskclip")
        print("----------|------------|------------")
        for mode, ms, ratio in bench_modes(vit, image, args.short_side, args.repeats, args.device):
            print(f"{mode:9} | {ms:10.0f} | {ratio:10.2f}x")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if value < 10 else f"{value:.0f}"
    return str(value)


if __name__ == "__main__":
    main()
