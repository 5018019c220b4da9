"""Annotation review on generated scenes with known errors: how well it flags them, and what it costs.

Generated scenes (tests/scenes.py), every pixel annotated; in each run a share
of the annotations (15% by default) carries one kind of error: a swapped label
(the disc annotated as the box), a missing region (the box never painted), or a
region dilated over its neighbour (the disc painted 6 pixels wider). The
review (fold students on the stored feature grids, confident learning) flags
annotations scoring below its ``flag_below``; precision and recall of the
flagged ones against the injected ones, per kind, and the review's time
against one training job on the same images.

Random ViT-B-16 weights: the students learn the scenes from their own
annotations, so the review's judges are as good as this data makes them.

    .venv/bin/python benchmarks/bench_review.py [--annotated 60] [--unannotated 20] [--share 0.15] [--short-side 224]
        [--kinds swap,missing,dilate]
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
from maskclip_engine.review.confident_learning import ReviewConfig, review_annotations  # noqa: E402
from maskclip_engine.students.training import TrainConfig, TrainingImage, train_student  # noqa: E402
from tests.scenes import CLASSES, make_scene  # noqa: E402
from tests.test_review import inject  # noqa: E402

KINDS = ("swap", "missing", "dilate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--device", default=None)
    parser.add_argument("--annotated", type=int, default=60)
    parser.add_argument("--unannotated", type=int, default=20)
    parser.add_argument("--share", type=float, default=0.15, help="of the annotations, per kind of error")
    parser.add_argument("--short-side", type=int, default=224)
    parser.add_argument("--iterations", type=int, default=200, help="steps of each fold student")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="error kinds to inject, comma-separated")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)  # the same random weights in every run, so runs compare
    segmenter = Segmenter.from_pretrained(args.model, "random", args.device)
    segmenter = segmenter.with_options(segmenter.options.replace(short_side=args.short_side))
    labels = LabelSet.parse(CLASSES)
    started = time.perf_counter()
    truth, images = [], []
    for i in range(args.annotated + args.unannotated):
        image, labelled = make_scene(7000 + i, 256, 320)
        features = segmenter.encode(image, mode="whole")  # once: what pre-annotation leaves in the store
        images.append(TrainingImage(image, features=features))
        truth.append(labelled)
    encoded = time.perf_counter() - started
    print(
        f"{args.model} (random weights), device {segmenter.clip.device}, torch threads {torch.get_num_threads()}, "
        f"{args.annotated} annotated + {args.unannotated} unannotated 256x320 scenes at short side "
        f"{args.short_side} (encoded once in {encoded:.0f} s), {args.share:.0%} of the annotations wrong per run, "
        f"fold students {args.iterations} steps\n"
    )
    count = max(1, round(args.share * args.annotated))
    config = ReviewConfig(iterations=args.iterations)
    plain = [TrainingImage(item.image, features=item.features) for item in images[args.annotated :]]
    rows, review_seconds = [], []
    for kind in args.kinds.split(","):
        rng = np.random.default_rng(KINDS.index(kind))  # each kind's own draw: the same whichever kinds run
        wrong = set(rng.choice(args.annotated, count, replace=False).tolist())
        items = [
            TrainingImage(
                images[i].image, inject(truth[i], kind)[0] if i in wrong else truth[i], features=images[i].features
            )
            for i in range(args.annotated)
        ]
        started = time.perf_counter()
        reviews = review_annotations(segmenter, items, plain, labels, config)
        review_seconds.append(time.perf_counter() - started)
        flagged = {r.index for r in reviews if r.score < config.flag_below}
        hits = len(flagged & wrong)
        ranked = [r.index for r in reviews]
        top = len(set(ranked[:count]) & wrong)
        rows.append((kind, count, len(flagged), hits / max(1, len(flagged)), hits / count, top / count))
        print(f"{kind}: {len(flagged)} flagged, {hits} of {count} injected ({review_seconds[-1]:.0f} s)", flush=True)

    train = [TrainingImage(images[i].image, truth[i], features=images[i].features) for i in range(args.annotated)]
    started = time.perf_counter()
    train_student(segmenter, train + plain, labels, TrainConfig())
    training = time.perf_counter() - started

    print("\nerror kind | injected | flagged | precision | recall | injected among the most suspect")
    print("-----------|----------|---------|-----------|--------|-------------------------------")
    for kind, injected, flagged, precision, recall, top in rows:
        print(f"{kind:10} | {injected:8} | {flagged:7} | {precision:9.2f} | {recall:6.2f} | {top:.2f}")
    review = float(np.median(review_seconds))
    print(
        f"\none review {review:.0f} s ({config.folds} fold students x {config.iterations} steps) against one "
        f"training job {training:.0f} s ({TrainConfig().iterations} steps): {review / training:.1f}x "
        "(both on stored features; goal precision and recall >= 0.8 for swaps and missing regions)"
    )


if __name__ == "__main__":
    main()
