"""MaskCLIP+ training: a student learns from human labels where they exist and pseudo-labels elsewhere.

Pseudo-labels are made online for each augmented batch: from the MaskCLIP
teacher (key smoothing and prompt denoising included) for the first part of
the schedule, then from the student itself (self-training). Human labels
override pseudo-labels on their pixels. SGD with a poly schedule, as in the paper.

How many steps: ``TrainConfig.schedule="adaptive"`` (the default) runs enough
steps for ``passes`` looks at every crop-sized view of the data, within
``min_iterations`` and ``iterations`` (:func:`planned_steps`), so a ten-image
project does not pay for a 400-step schedule sized for hundreds of images;
``"fixed"`` always runs ``iterations``. The count is fixed before the first step
and the poly schedule runs over it, so the learning rate reaches zero on the
last step whichever count it is; a shorter adaptive schedule starts from a
larger rate (:func:`initial_lr`), so a small project learns as much in fewer steps.

Two ways to make a batch:

* ``clip`` students train on the feature grid. Each image's CLIP features and
  keys come once from the segmenter's feature source (stored by
  pre-annotation, so usually no backbone pass at all), and every step crops,
  flips and rescales those grids (:func:`.augment.augment_grid`); the teacher
  refines the cropped grids as ``segment`` would. No CLIP pass runs per step.
* ResNet students train on pixels (:func:`.augment.augment`: scale, crop,
  flip, photometric distortion), as the paper does; while MaskCLIP teaches,
  each crop goes through CLIP once. ``TrainConfig.feature_grid=False`` trains
  a ``clip`` student this way too (a CLIP pass per crop and step), for
  comparison.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from maskclip_engine.errors import InvalidOptionError
from maskclip_engine.features.image_features import ImageFeatures
from maskclip_engine.head.pamr import refine_against_image
from maskclip_engine.head.refinement import refine_with_options
from maskclip_engine.labels import LabelSet
from maskclip_engine.result import upsample_argmax
from maskclip_engine.segmenter import Segmenter, label_logits
from maskclip_engine.students.augment import AugmentConfig, augment, augment_grid
from maskclip_engine.students.network import StudentConfig, StudentNet

log = logging.getLogger(__name__)

IGNORE = -1


SCHEDULES = ("adaptive", "fixed")


@dataclass(frozen=True)
class TrainConfig:
    iterations: int = 400  # the fixed schedule's steps; the most the adaptive schedule runs
    batch_size: int = 4
    crop: int = 320  # pixels; clip students crop crop // stride grid cells
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    power: float = 0.9
    self_training_after: float = 0.1  # fraction of the schedule taught by MaskCLIP
    scale_range: tuple[float, float] = (0.5, 2.0)  # pixel training: of a short side of `crop` pixels
    grid_scale_range: tuple[float, float] = (0.75, 1.5)  # grid training: of the stored grid
    # clip students train on stored feature grids; False trains them on pixel crops with a CLIP pass per step
    # (the paper's recipe: photometric distortion and true rescaling, at the cost of the backbone every step).
    feature_grid: bool = True
    # Of each batch, at least this share comes from annotated images when a project has both kinds, so a few
    # annotations are not drowned by many pseudo-labelled images (0: draw every image alike).
    annotated_share: float = 0.5
    seed: int = 0
    # Last, so configs written with positional fields keep their meaning.
    # "adaptive": steps follow the data's size (planned_steps); "fixed": always `iterations` steps.
    schedule: str = "adaptive"
    passes: float = 20.0  # adaptive: how often each crop-sized view of the data is drawn, on average
    # adaptive: never fewer steps (unless `iterations` is fewer). On the benchmark's ten annotated scenes, at the
    # paper's rate, 120 steps gave a held-out mIoU of 0.929, 160 gave 0.944, 200 gave 0.949 and 400 0.948; with the
    # rate initial_lr gives short schedules, 120 steps give 0.949, 0.949 and 0.950 (seeds 0 to 2; 200 steps at the
    # paper's rate gave 0.949, 0.948 and 0.950) in two thirds of the time.
    min_iterations: int = 120
    # adaptive: `lr` is the rate of a schedule of `iterations` steps, up to this many (the default 400 steps);
    # shorter schedules start faster.
    lr_steps: int = 400

    def __post_init__(self) -> None:
        if self.iterations <= 0 or self.batch_size <= 0:
            raise InvalidOptionError("iterations and batch_size must be positive.")
        if self.schedule not in SCHEDULES:
            raise InvalidOptionError(f"schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}.")
        if self.passes <= 0 or self.min_iterations <= 0 or self.lr_steps <= 0:
            raise InvalidOptionError("passes, min_iterations and lr_steps must be positive.")
        if self.crop % 32:
            raise InvalidOptionError(f"crop {self.crop} must be a multiple of 32.")
        if not 0 <= self.self_training_after <= 1:
            raise InvalidOptionError("self_training_after is a fraction of the schedule, between 0 and 1.")
        if not 0 <= self.annotated_share <= 1:
            raise InvalidOptionError("annotated_share is a share of each batch, between 0 and 1.")
        for name in ("scale_range", "grid_scale_range"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise InvalidOptionError(f"{name} must be (low, high) with 0 < low <= high, got {(low, high)}.")


@dataclass
class TrainingImage:
    """One image; ``labels`` (``HxW``, -1 = not annotated) are human ground truth where given.

    ``hint`` is an optional ``HxW`` label map that travels through augmentation
    with the image, for teachers that work from precomputed labels.
    ``features`` are the image's whole-image CLIP features when the caller
    already has them (e.g. encoded from the full-size image before it was
    downscaled); otherwise they are looked up or computed from ``image``.
    """

    image: np.ndarray
    labels: np.ndarray | None = None
    hint: np.ndarray | None = None
    features: ImageFeatures | None = None


@dataclass
class Batch:
    human: torch.Tensor  # [B, H, W], -1 where not annotated or padding
    hint: torch.Tensor  # [B, H, W], -1 where absent
    valid: torch.Tensor  # [B, H, W] bool, False on padding
    pixels: torch.Tensor | None = None  # [B, 3, H, W] RGB in 0..1 (pixel training)
    clip_features: torch.Tensor | None = None  # [B, D, h, w]
    clip_keys: torch.Tensor | None = None  # [B, K, h, w]

    @property
    def size(self) -> tuple[int, int]:
        return int(self.human.shape[-2]), int(self.human.shape[-1])


class Teacher(Protocol):
    needs_clip: bool

    def pseudo_labels(self, batch: Batch) -> torch.Tensor:
        """``[B, H, W]`` long labels for the batch, -1 where it has no opinion."""


class MaskClipTeacher:
    """MaskCLIP as ``segment`` runs it, with the segmenter's options, on each training crop as one window.

    Refinement (prompt denoising, either key-smoothing variant, and PAMR
    against the crop when the batch has pixels) and the labelling step (argmax
    of the upsampled maps, the background threshold on the upsampled
    probability) are ``segment``'s own functions.
    """

    needs_clip = True

    def __init__(self, segmenter: Segmenter, labels: LabelSet) -> None:
        self.segmenter = segmenter
        self.labels = labels
        self.text, self.owner = segmenter.label_texts(labels)

    def pseudo_labels(self, batch: Batch) -> torch.Tensor:
        opts = self.segmenter.options
        logits = label_logits(batch.clip_features, self.text, self.owner, len(self.labels))
        pixels = batch.pixels if batch.pixels is not None else [None] * len(logits)
        out = []
        for sample_logits, keys, sample_pixels in zip(logits, batch.clip_keys, pixels):
            refined = refine_with_options(sample_logits, keys, opts)
            rows = torch.arange(len(self.labels), device=sample_logits.device)
            if opts.pamr and sample_pixels is not None:
                refined = refine_against_image(
                    refined, self.segmenter.from_unit(sample_pixels), opts.pamr_iterations, opts.pamr_stride
                )
                if refined.probs.shape[0] != len(rows):  # PAMR keeps only the classes denoising kept
                    rows = torch.nonzero(refined.kept).flatten()
            label, confidence = upsample_argmax(refined.probs, batch.size, refined.scores)
            out.append(torch.where(confidence >= opts.bg_threshold, rows[label], IGNORE))
        return torch.stack(out)


class MapTeacher:
    """Pseudo-labels given ahead of time as label maps (each image's ``hint``), e.g. earlier predictions."""

    needs_clip = False

    def pseudo_labels(self, batch: Batch) -> torch.Tensor:
        return batch.hint


ProgressCallback = Callable[[dict], None]


def train_student(
    segmenter: Segmenter,
    images: Sequence[TrainingImage],
    labels: LabelSet,
    config: TrainConfig | None = None,
    student: StudentConfig | None = None,
    teacher: Teacher | None = None,
    progress: ProgressCallback | None = None,
) -> StudentNet:
    """Train a student for ``labels`` on ``images``; ``progress`` hears about every step.

    The student learns under ``segmenter.options`` (dense mode, refinements,
    background threshold of the teacher): record them in its checkpoint.
    """
    if not images:
        raise InvalidOptionError("training needs at least one image.")
    config = config or TrainConfig()
    student = student or StudentConfig()
    device = segmenter.clip.device
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    teacher = teacher or MaskClipTeacher(segmenter, labels)
    # One row per synonym: the student scores a label by its best synonym, as the teacher does.
    net = StudentNet(student, segmenter.text.embed(labels.prompts), owner=torch.tensor(labels.owner)).to(device)
    optimizer = torch.optim.SGD(
        [p for p in net.parameters() if p.requires_grad],
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    if net.needs_clip_features and config.feature_grid:
        make_batch, views = _grid_batches(segmenter, images, config, rng)
    else:
        make_batch, views = _pixel_batches(segmenter, images, config, rng, teacher, net.needs_clip_features)
    steps = planned_steps(config, views)
    log.info(
        "training %d steps (%s schedule, %.0f crop-sized views in %d images)",
        steps,
        config.schedule,
        views,
        len(images),
    )
    switch = math.ceil(steps * config.self_training_after)
    start_lr = initial_lr(config, steps)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = start_lr * (1 - step / steps) ** config.power
        phase = "teacher" if step < switch else "self-training"
        batch = make_batch(phase == "teacher")
        loss = _step(net, optimizer, teacher, batch, phase, segmenter.clip.autocast)
        if progress is not None:
            progress(
                {
                    "step": step + 1,
                    "iterations": steps,
                    "loss": loss,
                    "phase": phase,
                    "lr": optimizer.param_groups[0]["lr"],
                }
            )
    net.eval().requires_grad_(False)
    return net


def initial_lr(config: TrainConfig, steps: int) -> float:
    """The poly schedule's starting rate for a schedule of ``steps``: ``lr`` for the fixed schedule and for an
    adaptive one at its cap, ``lr * sqrt(reference / steps)`` for a shorter adaptive one, where ``reference``
    is the cap (``iterations``) or ``lr_steps`` if that is fewer (a cap raised past 400 does not make small
    projects' steps larger still).

    Fewer steps take larger ones, as a larger batch would: with the defaults a ten-image project's 120 steps
    start at 0.018 instead of 0.01, and learn what 200 steps at 0.01 did (benchmarks/bench_training.py).
    """
    reference = min(config.iterations, config.lr_steps)
    if config.schedule == "fixed" or steps >= reference:
        return config.lr
    return config.lr * math.sqrt(reference / steps)


def planned_steps(config: TrainConfig, views: float) -> int:
    """The number of SGD steps for data holding ``views`` crop-sized views (see :func:`crop_views`).

    Adaptive: ``passes`` draws of every view in batches of ``batch_size``, at
    least ``min_iterations`` and at most ``iterations``. A view is drawn about as
    often in a big project as in a smaller one, until the cap. With the defaults
    and 512x512 images (about two views each on ViT-B/16's grid), 40 images or more
    run the fixed schedule's 400 steps and 12 or fewer the floor's 120: a student
    needs about that many steps (at :func:`initial_lr`'s rate) to learn at all, whatever the data.
    """
    if config.schedule == "fixed":
        return config.iterations
    wanted = math.ceil(config.passes * views / config.batch_size)
    return min(config.iterations, max(config.min_iterations, wanted))


def crop_views(sizes: Sequence[tuple[int, int]], crop: int) -> float:
    """How many ``crop x crop`` views the images of ``sizes`` (``(height, width)``, in the crop's units)
    hold: each image's area over the crop's, at least one (a crop larger than the image still sees it all)."""
    return float(sum(max(1.0, height * width / crop**2) for height, width in sizes))


def _step(
    net: StudentNet,
    optimizer: torch.optim.Optimizer,
    teacher: Teacher,
    batch: Batch,
    phase: str,
    precision: Callable[[], AbstractContextManager],
) -> float:
    """One SGD step on ``batch``; returns the loss.

    The student's forward passes run under ``precision`` (the CLIP backbone's autocast: bf16 where the chip
    computes it natively), as the student will serve; its classifier, the loss, the gradients' accumulation
    into the float32 weights and the teacher stay float32.

    Self-training labels come from the training forward itself: no student has dropout or a BatchNorm that
    follows the batch (the ``clip`` head has neither; ResNets' BatchNorm is frozen), so its training forward
    computes what an eval-mode forward would, and a second, no-grad forward would only repeat it.
    """
    if phase == "teacher":
        with torch.no_grad():
            pseudo = teacher.pseudo_labels(batch)
    with precision():
        logits = net(batch.pixels, batch.clip_features)
    logits = _upsampled(logits.float(), batch.size)
    if phase != "teacher":
        pseudo = logits.detach().argmax(1)
    target = torch.where(batch.human >= 0, batch.human, pseudo)
    target = torch.where(batch.valid, target, IGNORE)
    loss = F.cross_entropy(logits, target, ignore_index=IGNORE)
    optimizer.zero_grad(set_to_none=True)
    if torch.isfinite(loss):
        loss.backward()
        optimizer.step()
    return loss.item()


def _sampler(images: Sequence[TrainingImage], share: float, rng: np.random.Generator) -> Callable[[], int]:
    """Image indices, each kind (annotated, not) in shuffled passes of its own.

    A pick comes from the annotated images with probability ``share``, or their share of the data set where
    that is larger; from either kind alone when the other is missing.
    """
    annotated = [i for i, item in enumerate(images) if item.labels is not None]
    plain = [i for i, item in enumerate(images) if item.labels is None]
    chance = max(share, len(annotated) / max(1, len(images))) if annotated and plain else float(bool(annotated))
    orders: dict[bool, list[int]] = {True: [], False: []}

    def pick() -> int:
        side = bool(rng.random() < chance)
        if not orders[side]:
            pool = annotated if side else plain
            orders[side].extend(pool[i] for i in rng.permutation(len(pool)))
        return orders[side].pop()

    return pick


def _label_stack(item: TrainingImage, size: tuple[int, int] | None = None) -> np.ndarray:
    """``[3, H, W]`` int maps that travel with the image: human labels, hint, and 0 inside the image."""
    height, width = item.image.shape[:2]
    blank = np.full((height, width), IGNORE, dtype=np.int64)
    stack = np.stack(
        [
            item.labels if item.labels is not None else blank,
            item.hint if item.hint is not None else blank,
            np.zeros((height, width), dtype=np.int64),  # 0 inside the image, -1 on padding after augmentation
        ]
    )
    if size is not None and size != (height, width):
        resized = F.interpolate(torch.from_numpy(stack)[None].float(), size=size, mode="nearest")[0]
        stack = resized.long().numpy()
    return stack


def _as_batch(maps: list[torch.Tensor], device: torch.device, **tensors: torch.Tensor | None) -> Batch:
    stacked = torch.stack(maps).to(device).long()
    return Batch(human=stacked[:, 0], hint=stacked[:, 1], valid=stacked[:, 2] >= 0, **tensors)


def _grid_batches(
    segmenter: Segmenter, images: Sequence[TrainingImage], config: TrainConfig, rng: np.random.Generator
) -> tuple[Callable[[bool], Batch], float]:
    """Batches of feature-grid crops for a ``clip`` student, and the grids' crop-sized views; each image's
    features are read once, here."""
    device = segmenter.clip.device
    grids = []
    for item in images:
        features = item.features or segmenter.encode(item.image, mode="whole")
        grid_features, grid_keys = features.whole_grid()
        # Kept in 16 bits between steps: a project's grids stay a few hundred megabytes.
        # Labels in 16 bits too: cropping them is a gather, and it moves a quarter of the bytes of int64.
        maps = torch.from_numpy(_label_stack(item, features.resized)).to(torch.int16)
        grids.append((grid_features.half(), grid_keys.half(), maps, features.stride))
    # Crops never larger than the smallest grid: a crop that is mostly padding teaches nothing.
    cells = min(config.crop // segmenter.stride, *(min(g.shape[-2:]) for g, *_ in grids))
    pick = _sampler(images, config.annotated_share, rng)

    def make(_teaching: bool) -> Batch:
        feature_crops, key_crops, maps = [], [], []
        for _ in range(config.batch_size):
            grid_features, grid_keys, stack, stride = grids[pick()]
            f, k, m = augment_grid(
                grid_features,
                grid_keys,
                stack,
                stride,
                cells,
                config.grid_scale_range,
                rng,
            )
            feature_crops.append(f)
            key_crops.append(k)
            maps.append(m)
        return _as_batch(
            maps,
            device,
            clip_features=torch.stack(feature_crops).to(device),
            clip_keys=torch.stack(key_crops).to(device),
        )

    return make, crop_views([tuple(g.shape[-2:]) for g, *_ in grids], cells)


def _pixel_batches(
    segmenter: Segmenter,
    images: Sequence[TrainingImage],
    config: TrainConfig,
    rng: np.random.Generator,
    teacher: Teacher,
    student_reads_clip: bool = False,
) -> tuple[Callable[[bool], Batch], float]:
    """Batches of augmented pixel crops, and the images' crop-sized views: for a ResNet student CLIP sees a
    crop only while it teaches; a ``clip`` student trained this way needs CLIP's features of every crop."""
    device = segmenter.clip.device
    augment_config = AugmentConfig(crop=config.crop, base_short_side=config.crop, scale_range=config.scale_range)
    pick = _sampler(images, config.annotated_share, rng)

    def make(teaching: bool) -> Batch:
        pixels, maps = [], []
        for _ in range(config.batch_size):
            item = images[pick()]
            x, m = augment(item.image, _label_stack(item), augment_config, rng)
            pixels.append(x)
            maps.append(m)
        batch = _as_batch(maps, device, pixels=torch.stack(pixels).to(device))
        if student_reads_clip or (teaching and teacher.needs_clip):
            features, keys = segmenter.dense_features_and_keys(segmenter.from_unit(batch.pixels))
            # Made in inference mode; a student's first layer needs its input saved for backward: plain copies.
            batch.clip_features, batch.clip_keys = features.clone(), keys.clone()
        return batch

    # Augmentation rescales each image to a short side of `crop` (times a random scale around one).
    sizes = [(config.crop, config.crop * max(item.image.shape[:2]) / min(item.image.shape[:2])) for item in images]
    return make, crop_views(sizes, config.crop)


def _upsampled(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
