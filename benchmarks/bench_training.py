"""Training speed of MaskCLIP+ students on this machine.

1. Throughput (images per second) of each training phase for each backbone.
2. With ``--full``: the whole path from Start Training to a judged model for a
   project of 50 annotated and 200 unannotated 512x512 images (synthetic
   scenes; the Label Studio download is not included): training with the
   configured schedule, then scoring candidate and MaskCLIP on held-out images.

Random CLIP weights (timing does not depend on them).

    .venv/bin/python benchmarks/bench_training.py [--backbones clip,resnet50] [--steps 6] [--full]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from maskclip_engine import LabelSet, Segmenter  # noqa: E402
from maskclip_engine.students.checkpoint import StudentCheckpoint
from maskclip_engine.students.gate import evaluate
from maskclip_engine.students.network import StudentConfig  # noqa: E402
from maskclip_engine.students.serving import StudentSegmenter  # noqa: E402
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
    """Seconds per step of each phase, measured after one warm-up step."""
    rows = {}
    for phase, fraction in (("teacher", 1.0), ("self-training", 0.0)):
        times = []

        def tick(_fields, times=times):
            times.append(time.perf_counter())

        cfg = TrainConfig(**{**config.__dict__, "iterations": steps + 1, "self_training_after": fraction})
        train_student(segmenter, images, labels, cfg, student_config(backbone), progress=tick)
        per_step = (times[-1] - times[0]) / steps
        rows[phase] = cfg.batch_size / per_step
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--backbones", default="clip,resnet50")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default=None)
    parser.add_argument("--full", action="store_true", help="also time the whole schedule (slow on a CPU)")
    args = parser.parse_args()

    segmenter = Segmenter.from_pretrained(args.model, "random", args.device)
    labels = LabelSet.parse(CLASSES)
    config = TrainConfig()
    annotated, plain = scenes(50, True, 0), scenes(200, False, 1000)
    images = annotated[:40] + plain
    held_out = annotated[40:]
    device = segmenter.clip.device
    print(
        f"model {args.model} (random weights), device {device}, torch threads {torch.get_num_threads()}, "
        f"crop {config.crop}, batch {config.batch_size}, schedule {config.iterations} iterations\n"
    )
    print("backbone | teacher phase img/s | self-training img/s | projected schedule min")
    print("---------|---------------------|---------------------|-----------------------")
    measured = {}
    for backbone in args.backbones.split(","):
        rates = throughput(segmenter, images, labels, backbone, args.steps, config)
        split = config.self_training_after
        seconds = (
            config.iterations * config.batch_size * (split / rates["teacher"] + (1 - split) / rates["self-training"])
        )
        measured[backbone] = seconds
        print(f"{backbone:8} | {rates['teacher']:19.2f} | {rates['self-training']:19.2f} | {seconds / 60:22.1f}")

    if args.full:
        print("\nbackbone | train s | judge s | total s | candidate mIoU | MaskCLIP mIoU")
        print("---------|---------|---------|---------|----------------|--------------")
        for backbone in args.backbones.split(","):
            start = time.perf_counter()
            net = train_student(segmenter, images, labels, config, student_config(backbone))
            trained = time.perf_counter()
            student = StudentSegmenter(segmenter, StudentCheckpoint(net, CLASSES, [[c] for c in CLASSES], {}))
            candidate = evaluate(lambda im, s=student: s.segment(im).label_map, held_out, 3).miou
            teacher = evaluate(lambda im: segmenter.segment(im, labels).label_map, held_out, 3).miou
            done = time.perf_counter()
            print(
                f"{backbone:8} | {trained - start:7.0f} | {done - trained:7.0f} | {done - start:7.0f} | "
                f"{candidate:14.3f} | {teacher:13.3f}"
            )
    np.random.seed(0)


if __name__ == "__main__":
    main()
