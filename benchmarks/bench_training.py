"""Training speed of MaskCLIP+ students on this machine.

1. Throughput (images per second) of each training phase for each backbone and recipe.
2. With ``--full``: Start Training to an active student for a project of 50
   annotated and 200 unannotated 512x512 images (generated scenes; the Label
   Studio download is not included) whose CLIP features are already in the
   feature store, as pre-annotation leaves them: train with the configured
   schedule, judge the candidate against MaskCLIP on the held-out images (the
   gate's bootstrap), store and activate it. The same scenes and seed also run
   the pixel recipe (a CLIP pass per crop and step), for the time and the
   held-out mIoU it gives.

Random CLIP weights (timing does not depend on them).

    .venv/bin/python benchmarks/bench_training.py [--backbones clip,resnet50] [--steps 6] [--full] [--no-pixel]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from maskclip_engine import LabelSet, Segmenter  # noqa: E402
from maskclip_engine.features.source import FeatureSource  # noqa: E402
from maskclip_engine.features.store import FeatureStore  # noqa: E402
from maskclip_engine.students.checkpoint import StudentCheckpoint  # noqa: E402
from maskclip_engine.students.gate import judge  # noqa: E402
from maskclip_engine.students.network import StudentConfig  # noqa: E402
from maskclip_engine.students.registry import ModelRegistry  # noqa: E402
from maskclip_engine.students.training import TrainConfig, TrainingImage, train_student  # noqa: E402
from tests.scenes import CLASSES, make_scene  # noqa: E402


def scenes(count: int, annotated: bool, offset: int) -> list[TrainingImage]:
    out = []
    for i in range(count):
        image, labels = make_scene(offset + i, 512, 512)
        out.append(TrainingImage(image, labels if annotated else None))
    return out


def student_config(backbone: str) -> StudentConfig:
    # Throughput does not depend on the starting weights, and a benchmark must not download ImageNet's.
    return StudentConfig(backbone=backbone, backbone_weights="random")


def throughput(segmenter: Segmenter, images, labels, backbone: str, steps: int, config: TrainConfig) -> dict:
    """Images per second of each phase, measured after one warm-up step."""
    rows = {}
    for phase, fraction in (("teacher", 1.0), ("self-training", 0.0)):
        times = []

        def tick(_fields, times=times):
            times.append(time.perf_counter())

        cfg = dataclasses.replace(config, iterations=steps + 1, self_training_after=fraction)
        train_student(segmenter, images, labels, cfg, student_config(backbone), progress=tick)
        rows[phase] = cfg.batch_size * steps / (times[-1] - times[0])
    return rows


def start_training(segmenter: Segmenter, train, held_out, labels, config: TrainConfig, folder: Path) -> dict:
    """Start Training to an active student: train, judge, store, activate."""
    started = time.perf_counter()
    net = train_student(segmenter, train, labels, config, student_config("clip"))
    trained = time.perf_counter()
    registry = ModelRegistry(folder)
    checkpoint = StudentCheckpoint(net, CLASSES, [[c] for c in CLASSES], {}, options=segmenter.options)
    verdict = judge(segmenter, registry, 1, checkpoint, labels, held_out)
    version = registry.add(1, checkpoint)
    if verdict.promoted:
        registry.activate(version)
    done = time.perf_counter()
    return {
        "train": trained - started,
        "judge": done - trained,
        "total": done - started,
        "candidate": verdict.candidate,
        "maskclip": verdict.current,
        "promoted": verdict.promoted,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--backbones", default="clip,resnet50")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default=None)
    parser.add_argument("--full", action="store_true", help="also time Start Training to an active student")
    parser.add_argument("--no-pixel", action="store_true", help="with --full: skip the pixel recipe (slow on a CPU)")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="bench-training-"))
    store = FeatureSource(None, FeatureStore(folder / "features", 1 << 40))
    torch.manual_seed(0)  # the same random weights in every run, so runs compare
    segmenter = Segmenter.from_pretrained(args.model, "random", args.device, features=store)
    labels = LabelSet.parse(CLASSES)
    config = TrainConfig()
    annotated, plain = scenes(50, True, 0), scenes(200, False, 1000)
    images, held_out = annotated[:40] + plain, annotated[40:]
    started = time.perf_counter()
    for item in images + held_out:  # what pre-annotation leaves in the store (not part of the timings below)
        item.features = segmenter.encode(item.image, mode="whole")
    stored = time.perf_counter() - started
    print(
        f"model {args.model} (random weights), device {segmenter.clip.device}, torch threads "
        f"{torch.get_num_threads()}, crop {config.crop}, batch {config.batch_size}, schedule {config.iterations} "
        f"steps; {len(images) + len(held_out)} images encoded into the feature store in {stored:.0f} s\n"
    )
    print("backbone | recipe | teacher phase img/s | self-training img/s | projected schedule min")
    print("---------|--------|---------------------|---------------------|-----------------------")
    for backbone in args.backbones.split(","):
        recipes = ("grid", "pixel") if backbone == "clip" else ("pixel",)
        for recipe in recipes:
            cfg = dataclasses.replace(config, feature_grid=recipe == "grid")
            rates = throughput(segmenter, images, labels, backbone, args.steps, cfg)
            split = cfg.self_training_after
            seconds = (
                cfg.iterations * cfg.batch_size * (split / rates["teacher"] + (1 - split) / rates["self-training"])
            )
            print(
                f"{backbone:8} | {recipe:6} | {rates['teacher']:19.2f} | {rates['self-training']:19.2f} | "
                f"{seconds / 60:22.1f}"
            )

    if args.full:
        print("\nclip student | train s | judge s | total s | held-out mIoU | MaskCLIP mIoU | promoted")
        print("-------------|---------|---------|---------|---------------|---------------|---------")
        for recipe in ("grid",) if args.no_pixel else ("grid", "pixel"):
            cfg = dataclasses.replace(config, feature_grid=recipe == "grid")
            row = start_training(segmenter, images, held_out, labels, cfg, folder / recipe)
            print(
                f"{recipe:12} | {row['train']:7.0f} | {row['judge']:7.0f} | {row['total']:7.0f} | "
                f"{row['candidate']:13.3f} | {row['maskclip']:13.3f} | {row['promoted']}"
            )


if __name__ == "__main__":
    main()
