"""Which task next: labelling in a task score's order against random order, on generated scenes.

A simulated annotator labels generated scenes (tests/scenes.py; the scene's
ground truth is the annotation). Each seed draws its own pool of unlabelled
scenes; a held-out set, the same for every seed, measures the student. A
project starts with ``--start`` tasks labelled in random order (the same ones
for every strategy of a seed); then, round after round, the next ``--step``
tasks are labelled and the ``clip`` student is retrained on every labelled
task from their stored CLIP features, until ``--budget`` tasks are labelled.

The next tasks are, for ``random``, a random draw from the rest of the pool;
for each task score (:mod:`maskclip_engine.task_scores`), the ones with the
lowest score, as the Data Manager sorted by *Prediction score* ascending shows
them. The score is the one the backend would serve at that moment: the active
student's, or MaskCLIP's zero-shot one while no student is active. Each
retrained student goes through the promotion gate (the gate's own bootstrap,
on the held-out set, against the active model) and becomes the active one if
it passes, so scores refresh with every promotion, as in the product. The
curves are the held-out mIoU of the latest trained student.

Every pixel of a labelled task is annotated and the student trains on the
labelled tasks only, so MaskCLIP's pseudo-labels never count (no teacher phase).
The student is smaller than the product's (``--hidden``, 256 in the product)
and trains briefly, so the whole study fits in about ten minutes on two cores.

Random ViT-B-16 weights: the student learns the scenes from their annotations,
but MaskCLIP's zero-shot probabilities mean nothing, so this measures how the
scores behave on these scenes only, not on real images.

    .venv/bin/python benchmarks/bench_active_learning.py [--seeds 3] [--threads 1] [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from maskclip_engine import LabelSet, Segmenter  # noqa: E402
from maskclip_engine.miou import Scores, confusion_matrix, scores  # noqa: E402
from maskclip_engine.result import result_from_probabilities  # noqa: E402
from maskclip_engine.students.checkpoint import StudentCheckpoint  # noqa: E402
from maskclip_engine.students.gate import (  # noqa: E402
    GateConfig,
    PredictItem,
    block_matrices,
    decide,
    maskclip_predictor,
    student_predictor,
)
from maskclip_engine.students.network import StudentConfig  # noqa: E402
from maskclip_engine.students.serving import StudentSegmenter  # noqa: E402
from maskclip_engine.students.training import TrainConfig, TrainingImage, train_student  # noqa: E402
from maskclip_engine.task_scores import KINDS  # noqa: E402
from tests.scenes import CLASSES, make_scene  # noqa: E402

STRATEGIES: tuple[str, ...] = ("random", *KINDS)


@dataclass(frozen=True)
class StudyConfig:
    """Sizes of one study; ``reference`` is the annotation count whose random-order mIoU each score must reach."""

    pool: int = 64
    held_out: int = 16
    start: int = 4
    step: int = 4
    budget: int = 32
    reference: int = 24
    height: int = 128
    width: int = 160
    train: TrainConfig = TrainConfig(iterations=50, lr=0.1, crop=160, self_training_after=0.0)
    student: StudentConfig = StudentConfig(backbone="clip", hidden=64)
    gate: GateConfig = GateConfig()

    @property
    def schedule(self) -> list[int]:
        """Labelled-task counts at which the student is retrained and measured."""
        return list(range(self.start, self.budget + 1, self.step))


QUICK = dataclasses.replace(
    StudyConfig(),
    pool=24,
    held_out=8,
    budget=12,
    reference=12,
    train=dataclasses.replace(StudyConfig().train, iterations=30),
)


@dataclass(frozen=True)
class Served:
    """The model the backend serves: its task scores for an image, and its held-out counts for the gate."""

    name: str
    task_scores: Callable[[TrainingImage], dict[str, float]]
    held_out: Scores
    blocks: np.ndarray


def encoded_scenes(segmenter: Segmenter, count: int, offset: int, config: StudyConfig) -> list[TrainingImage]:
    """Scenes with their annotations and stored features (what pre-annotation leaves in the store)."""
    items = []
    for i in range(count):
        image, truth = make_scene(offset + i, config.height, config.width)
        items.append(TrainingImage(image, truth, features=segmenter.encode(image, mode="whole")))
    return items


def served_model(name: str, predict: PredictItem, scorer, held_out: Sequence[TrainingImage], config: StudyConfig):
    """A model's held-out scores and gate blocks, with the task scores it would put on predictions."""
    total = np.zeros((len(CLASSES), len(CLASSES) + 1), dtype=np.int64)
    blocks = []
    for item in held_out:
        prediction = predict(item)
        total += confusion_matrix(prediction, item.labels, len(CLASSES))
        blocks.append(block_matrices(prediction, item.labels, len(CLASSES), config.gate.blocks))
    return Served(name, scorer, scores(total), np.concatenate(blocks))


def maskclip_served(segmenter: Segmenter, labels: LabelSet, held_out: Sequence[TrainingImage], config: StudyConfig):
    def task_scores(item: TrainingImage) -> dict[str, float]:
        return segmenter.segment_features(item.features, labels, item.image).task_scores

    return served_model("maskclip", maskclip_predictor(segmenter, labels), task_scores, held_out, config)


def trained(
    segmenter: Segmenter,
    labels: LabelSet,
    labelled: Sequence[TrainingImage],
    held_out: Sequence[TrainingImage],
    config: StudyConfig,
    seed: int,
) -> Served:
    """A student trained on the labelled tasks, scored on the held-out set."""
    train = dataclasses.replace(config.train, seed=seed)
    net = train_student(segmenter, labelled, labels, train, config.student)
    checkpoint = StudentCheckpoint(net, CLASSES, [[c] for c in CLASSES], {}, options=segmenter.options)
    student = StudentSegmenter(segmenter, checkpoint)
    bg = segmenter.options.bg_threshold

    def task_scores(item: TrainingImage) -> dict[str, float]:
        probs = student.probabilities(item.image, item.features)
        return result_from_probabilities(probs, item.image.shape[:2], CLASSES, bg_threshold=bg).task_scores

    return served_model(f"student-{len(labelled)}", student_predictor(student, bg), task_scores, held_out, config)


def promoted(candidate: Served, active: Served, config: StudyConfig) -> Served:
    """The model served after the gate judged ``candidate`` against the active one."""
    verdict = decide(candidate.held_out, active.held_out, candidate.blocks, active.blocks, config.gate, active.name)
    return candidate if verdict.promoted else active


def next_tasks(
    strategy: str, active: Served, pool: Sequence[TrainingImage], left: list[int], count: int, rng
) -> list[int]:
    """The next ``count`` pool indices to label: random ones, or the lowest task scores of the active model."""
    if strategy == "random":
        return [int(i) for i in rng.choice(left, count, replace=False)]
    ranked = sorted(left, key=lambda i: (active.task_scores(pool[i])[strategy], i))
    return ranked[:count]


def run_seed(
    segmenter: Segmenter,
    labels: LabelSet,
    pool: Sequence[TrainingImage],
    held_out: Sequence[TrainingImage],
    maskclip: Served,
    config: StudyConfig,
    seed: int,
    strategies: Sequence[str] = STRATEGIES,
) -> tuple[dict[str, list[float]], int]:
    """Held-out mIoU after each round, per strategy; and how many selections MaskCLIP's scores made."""
    rng = np.random.default_rng(seed)
    start = [int(i) for i in rng.choice(len(pool), config.start, replace=False)]
    first = trained(segmenter, labels, [pool[i] for i in start], held_out, config, seed)
    curves, by_maskclip = {}, 0
    for strategy in strategies:
        labelled, active = list(start), promoted(first, maskclip, config)
        curve = [first.held_out.miou]
        draw = np.random.default_rng([seed, 1])
        for count in config.schedule[1:]:
            left = [i for i in range(len(pool)) if i not in labelled]
            by_maskclip += int(strategy != "random" and active is maskclip)
            labelled += next_tasks(strategy, active, pool, left, count - len(labelled), draw)
            candidate = trained(segmenter, labels, [pool[i] for i in labelled], held_out, config, seed)
            curve.append(candidate.held_out.miou)
            active = promoted(candidate, active, config)
        curves[strategy] = curve
    return curves, by_maskclip


def annotations_needed(curve: Sequence[float], schedule: Sequence[int], target: float) -> float | None:
    """Annotations at which ``curve`` first reaches ``target``, linearly interpolated; None if it never does."""
    for i, value in enumerate(curve):
        if value >= target:
            if i == 0:
                return float(schedule[0])
            low, high = curve[i - 1], value
            return schedule[i - 1] + (target - low) / (high - low) * (schedule[i] - schedule[i - 1])
    return None


def at(curve: Sequence[float], schedule: Sequence[int], count: int) -> float:
    return float(np.interp(count, schedule, curve))


def plot(path: Path, schedule: Sequence[int], means: dict[str, np.ndarray], sds: dict[str, np.ndarray], target: float):
    """Mean curves (±sd bars) as a PNG, drawn with PIL (matplotlib is not a dependency)."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 760, 480, 60, 150, 30, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    values = np.concatenate([np.concatenate([means[s] - sds[s], means[s] + sds[s]]) for s in means] + [[target]])
    low, high = np.floor(values.min() * 20) / 20, np.ceil(values.max() * 20) / 20
    high = max(high, low + 0.05)

    def xy(count: float, value: float) -> tuple[float, float]:
        x = left + (count - schedule[0]) / max(1, schedule[-1] - schedule[0]) * (width - left - right)
        return x, top + (high - value) / (high - low) * (height - top - bottom)

    for tick in np.arange(low, high + 1e-9, 0.05):
        y = xy(schedule[0], tick)[1]
        draw.line([(left, y), (width - right, y)], fill=(225, 225, 225))
        draw.text((8, y - 6), f"{tick:.2f}", fill="black")
    for count in schedule:
        x = xy(count, low)[0]
        draw.text((x - 6, height - bottom + 6), str(count), fill="black")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text((left, height - 20), "annotated tasks", fill="black")
    draw.text((left, 8), "held-out mIoU of the student (mean over seeds, bars: sd)", fill="black")
    y = xy(schedule[0], target)[1]
    for x in range(left, width - right, 12):
        draw.line([(x, y), (x + 6, y)], fill=(120, 120, 120))
    colours = [(0, 0, 0), (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
    for row, (strategy, colour) in enumerate(zip(means, colours)):
        points = [xy(c, v) for c, v in zip(schedule, means[strategy])]
        draw.line(points, fill=colour, width=2)
        for (x, _), mean, sd in zip(points, means[strategy], sds[strategy]):
            draw.line([(x, xy(schedule[0], mean + sd)[1]), (x, xy(schedule[0], mean - sd)[1])], fill=colour)
        draw.line([(width - right + 12, top + 12 + 18 * row), (width - right + 36, top + 12 + 18 * row)], colour, 2)
        draw.text((width - right + 42, top + 6 + 18 * row), strategy, fill="black")
    draw.text((width - right + 12, top + 12 + 18 * len(means)), "- - random's target", fill=(120, 120, 120))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def report(curves: list[dict[str, list[float]]], config: StudyConfig) -> tuple[dict, dict, float]:
    """Print the table and the annotations each score needs; returns means, sds and random's target."""
    schedule = config.schedule
    means = {s: np.mean([c[s] for c in curves], axis=0) for s in curves[0]}
    sds = {s: np.std([c[s] for c in curves], axis=0) for s in curves[0]}
    print("annotations | " + " | ".join(f"{s:>13}" for s in means))
    print("------------|" + "|".join("-" * 15 for _ in means))
    for row, count in enumerate(schedule):
        cells = " | ".join(f"{means[s][row]:.3f} ± {sds[s][row]:.3f}" for s in means)
        print(f"{count:11} | {cells}")
    target = at(means["random"], schedule, config.reference)
    goal = 0.75 * config.reference
    print(
        f"\nrandom order reaches mIoU {target:.3f} at {config.reference} annotations; goal: a score needs <= {goal:g}"
    )
    if target <= means["random"][0]:
        print("random order does not improve on its start here: the scores cannot be told apart (train longer)")
    for strategy in means:
        if strategy == "random":
            continue
        needed = annotations_needed(means[strategy], schedule, target)
        seeds = [annotations_needed(c[strategy], schedule, target) for c in curves]
        per_seed = ", ".join("-" if n is None else f"{n:.1f}" for n in seeds)
        verdict = "never" if needed is None else f"{needed:.1f}"
        meets = needed is not None and needed <= goal
        print(f"{strategy:9}: {verdict:>5} annotations (per seed: {per_seed}){'  meets the goal' if meets else ''}")
    return means, sds, target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--device", default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="a smoke run of about a minute (smaller everything)")
    parser.add_argument("--short-side", type=int, default=160)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "active_learning.png")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = QUICK if args.quick else StudyConfig()
    seeds = min(args.seeds, 2) if args.quick else args.seeds

    began = time.perf_counter()
    segmenter = Segmenter.from_pretrained(args.model, "random", args.device)
    segmenter = segmenter.with_options(segmenter.options.replace(short_side=args.short_side))
    labels = LabelSet.parse(CLASSES)
    held_out = encoded_scenes(segmenter, config.held_out, 90_000, config)
    maskclip = maskclip_served(segmenter, labels, held_out, config)
    print(
        f"{args.model} (random weights), device {segmenter.clip.device}, torch threads {torch.get_num_threads()}; "
        f"per seed a pool of {config.pool} scenes ({config.height}x{config.width}, short side {args.short_side}), "
        f"{config.held_out} held out; {config.start} tasks to start, {config.step} per round up to {config.budget}; "
        f"clip student hidden {config.student.hidden}, {config.train.iterations} steps; {seeds} seeds. "
        f"MaskCLIP held-out mIoU {maskclip.held_out.miou:.3f}.",
        flush=True,
    )
    curves, by_maskclip = [], 0
    for seed in range(seeds):
        pool = encoded_scenes(segmenter, config.pool, 10_000 * (seed + 1), config)
        seed_curves, seed_maskclip = run_seed(segmenter, labels, pool, held_out, maskclip, config, seed)
        curves.append(seed_curves)
        by_maskclip += seed_maskclip
        print(f"seed {seed} done at {time.perf_counter() - began:.0f} s", flush=True)
    selections = seeds * len(KINDS) * (len(config.schedule) - 1)
    print(f"\nMaskCLIP's zero-shot scores chose {by_maskclip} of {selections} rounds; the active student the rest\n")
    means, sds, target = report(curves, config)
    plot(args.out, config.schedule, means, sds, target)
    print(
        f"\nplot: {args.out}; wall time {time.perf_counter() - began:.0f} s. Random weights: these are the scores' "
        "behaviour on generated scenes only, not evidence about real images."
    )


if __name__ == "__main__":
    main()
