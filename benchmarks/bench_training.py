"""Training speed of MaskCLIP+ students on this machine.

1. Throughput (images per second) of each training phase for each backbone and recipe.
2. With ``--full``: Start Training to an active student for a project of 50
   annotated and 200 unannotated 512x512 images (generated scenes; the Label
   Studio download is not included; ``--annotated``/``--plain`` change the
   counts, a fifth of the annotated images is held out as the job does) whose
   CLIP features are already in the feature store, as pre-annotation leaves
   them: train, judge the candidate against MaskCLIP on the held-out images
   (the gate's bootstrap), store and activate it. Each schedule of
   ``--schedules`` (adaptive: steps follow the data; fixed: 400 steps) runs on
   the same scenes and seed, side by side, and so does the pixel recipe (a
   CLIP pass per crop and step) unless ``--no-pixel``. "x first pass" is Start
   Training's time over the CLIP pass of the project's images (what a first
   pre-annotation pass spends most of its time on).

Random CLIP weights (timing does not depend on them).

    .venv/bin/python benchmarks/bench_training.py [--backbones clip,resnet50] [--steps 6] [--full] [--no-pixel]
        [--no-throughput] [--annotated 50] [--plain 200] [--schedules adaptive,fixed]
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

        cfg = dataclasses.replace(config, iterations=steps + 1, self_training_after=fraction, schedule="fixed")
        train_student(segmenter, images, labels, cfg, student_config(backbone), progress=tick)
        rows[phase] = cfg.batch_size * steps / (times[-1] - times[0])
    return rows


def start_training(segmenter: Segmenter, train, held_out, labels, config: TrainConfig, folder: Path) -> dict:
    """Start Training to an active student: train, judge, store, activate."""
    steps = []
    started = time.perf_counter()
    net = train_student(segmenter, train, labels, config, student_config("clip"), progress=steps.append)
    trained = time.perf_counter()
    registry = ModelRegistry(folder)
    checkpoint = StudentCheckpoint(net, CLASSES, [[c] for c in CLASSES], {}, options=segmenter.options)
    verdict = judge(segmenter, registry, 1, checkpoint, labels, held_out)
    version = registry.add(1, checkpoint)
    if verdict.promoted:
        registry.activate(version)
    done = time.perf_counter()
    return {
        "steps": len(steps),
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
    parser.add_argument("--no-throughput", action="store_true", help="skip the throughput table")
    parser.add_argument("--annotated", type=int, default=50, help="annotated images of the project (a fifth held out)")
    parser.add_argument("--plain", type=int, default=200, help="unannotated images of the project")
    parser.add_argument("--schedules", default="adaptive,fixed", help="with --full: training schedules to compare")
    args = parser.parse_args()
    if args.annotated < 2:
        parser.error("--annotated must be at least 2: one image trains, one is held out")

    folder = Path(tempfile.mkdtemp(prefix="bench-training-"))
    store = FeatureSource(None, FeatureStore(folder / "features", 1 << 40))
    torch.manual_seed(0)  # the same random weights in every run, so runs compare
    segmenter = Segmenter.from_pretrained(args.model, "random", args.device, features=store)
    labels = LabelSet.parse(CLASSES)
    config = TrainConfig()
    annotated, plain = scenes(args.annotated, True, 0), scenes(args.plain, False, 1000)
    training = args.annotated - max(1, round(args.annotated * 0.2))
    images, held_out = annotated[:training] + plain, annotated[training:]
    started = time.perf_counter()
    for item in images + held_out:  # what pre-annotation leaves in the store (not part of the timings below)
        item.features = segmenter.encode(item.image, mode="whole")
    stored = time.perf_counter() - started
    print(
        f"model {args.model} (random weights), device {segmenter.clip.device}, torch threads "
        f"{torch.get_num_threads()}, crop {config.crop}, batch {config.batch_size}, schedule {config.iterations} "
        f"steps at most; {len(images)} training and {len(held_out)} held-out images encoded into the feature "
        f"store in {stored:.1f} s\n"
    )
    if not args.no_throughput:
        throughput_table(segmenter, images, labels, config, args)
    if args.full:
        columns = ["clip student   ", "steps", "train s", "judge s", "total s", "x first pass"]
        columns += ["held-out mIoU", "MaskCLIP mIoU", "promoted"]
        print("\n" + " | ".join(columns))
        print("-|-".join("-" * len(c) for c in columns))
        for recipe in ("grid",) if args.no_pixel else ("grid", "pixel"):
            for schedule in args.schedules.split(","):
                cfg = dataclasses.replace(config, feature_grid=recipe == "grid", schedule=schedule)
                row = start_training(segmenter, images, held_out, labels, cfg, folder / f"{recipe}-{schedule}")
                print(
                    f"{recipe + ' ' + schedule:15} | {row['steps']:5} | {row['train']:7.1f} | {row['judge']:7.1f} | "
                    f"{row['total']:7.1f} | {row['total'] / stored:12.1f} | {row['candidate']:13.3f} | "
                    f"{row['maskclip']:13.3f} | {row['promoted']}"
                )


def throughput_table(segmenter: Segmenter, images, labels, config: TrainConfig, args: argparse.Namespace) -> None:
    print("backbone | recipe | teacher phase img/s | self-training img/s | projected 400-step schedule min")
    print("---------|--------|---------------------|---------------------|--------------------------------")
    for backbone in args.backbones.split(","):
        recipes = ("grid", "pixel") if backbone == "clip" else ("pixel",)
        for recipe in recipes:
            cfg = dataclasses.replace(config, feature_grid=recipe == "grid", schedule="fixed")
            rates = throughput(segmenter, images, labels, backbone, args.steps, cfg)
            split = cfg.self_training_after
            seconds = (
                cfg.iterations * cfg.batch_size * (split / rates["teacher"] + (1 - split) / rates["self-training"])
            )
            print(
                f"{backbone:8} | {recipe:6} | {rates['teacher']:19.2f} | {rates['self-training']:19.2f} | "
                f"{seconds / 60:22.1f}"
            )


if __name__ == "__main__":
    main()
