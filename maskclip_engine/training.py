"""MaskCLIP+ training: a student learns from human labels where they exist and pseudo-labels elsewhere.

Pseudo-labels are made online for each augmented batch: from the MaskCLIP
teacher (key smoothing and prompt denoising included) for the first part of
the schedule, then from the student itself (self-training). Human labels
override pseudo-labels on their pixels. SGD with a poly schedule, as in the paper.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .augment import AugmentConfig, augment
from .dense import dense_features
from .errors import InvalidOptionError
from .metrics import Scores, confusion_matrix, scores
from .pamr import refine_against_image
from .prompts import LabelSet
from .result import upsample_argmax
from .segmenter import Segmenter
from .student import StudentConfig, StudentNet

log = logging.getLogger(__name__)

IGNORE = -1


@dataclass(frozen=True)
class TrainConfig:
    iterations: int = 400
    batch_size: int = 4
    crop: int = 320
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    power: float = 0.9
    self_training_after: float = 0.1  # fraction of the schedule taught by MaskCLIP
    scale_range: tuple[float, float] = (0.5, 2.0)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iterations <= 0 or self.batch_size <= 0:
            raise InvalidOptionError("iterations and batch_size must be positive.")
        if self.crop % 32:
            raise InvalidOptionError(f"crop {self.crop} must be a multiple of 32.")
        if not 0 <= self.self_training_after <= 1:
            raise InvalidOptionError("self_training_after is a fraction of the schedule, between 0 and 1.")


@dataclass
class TrainingImage:
    """One image; ``labels`` (``HxW``, -1 = not annotated) are human ground truth where given.

    ``hint`` is an optional ``HxW`` label map that travels through augmentation
    with the image, for teachers that work from precomputed labels.
    """

    image: np.ndarray
    labels: np.ndarray | None = None
    hint: np.ndarray | None = None


@dataclass
class Batch:
    pixels: torch.Tensor  # [B, 3, H, W] RGB in 0..1
    human: torch.Tensor  # [B, H, W], -1 where not annotated or padding
    hint: torch.Tensor  # [B, H, W], -1 where absent
    valid: torch.Tensor  # [B, H, W] bool, False on padding
    clip_features: torch.Tensor | None = None
    clip_keys: torch.Tensor | None = None


class Teacher(Protocol):
    needs_clip: bool

    def pseudo_labels(self, batch: Batch) -> torch.Tensor:
        """``[B, H, W]`` long labels for the batch, -1 where it has no opinion."""


class MaskClipTeacher:
    """MaskCLIP as ``segment`` runs it, with the segmenter's options, on each training crop as one window.

    Refinement (prompt denoising, either key-smoothing variant, PAMR against the
    crop) and the labelling step (argmax of the upsampled maps, the background
    threshold on the upsampled probability) are ``segment``'s own functions.
    """

    needs_clip = True

    def __init__(self, segmenter: Segmenter, labels: LabelSet) -> None:
        self.segmenter = segmenter
        self.labels = labels
        self.text = segmenter.text.embed(labels.prompts).to(segmenter.clip.device)
        self.owner = torch.tensor(labels.owner, device=segmenter.clip.device)

    def pseudo_labels(self, batch: Batch) -> torch.Tensor:
        opts = self.segmenter.options
        logits = self.segmenter._label_logits(batch.clip_features, self.text, self.owner, len(self.labels))
        shape = tuple(batch.pixels.shape[-2:])
        out = []
        for sample_logits, keys, pixels in zip(logits, batch.clip_keys, batch.pixels):
            refined = Segmenter._refine(sample_logits, keys, opts)
            rows = torch.arange(len(self.labels), device=sample_logits.device)
            if opts.pamr:
                normalized = (pixels - self.segmenter._mean) / self.segmenter._std
                refined = refine_against_image(refined, normalized, opts.pamr_iterations, opts.pamr_stride)
                if refined.probs.shape[0] != len(rows):  # PAMR keeps only the classes denoising kept
                    rows = torch.nonzero(refined.kept).flatten()
            label, confidence = upsample_argmax(refined.probs, shape, refined.scores)
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
    text = segmenter.text.embed(labels.prompts)
    net = StudentNet(student, text, owner=torch.tensor(labels.owner)).to(device)
    optimizer = torch.optim.SGD(
        [p for p in net.parameters() if p.requires_grad],
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    augment_config = AugmentConfig(crop=config.crop, base_short_side=config.crop, scale_range=config.scale_range)
    switch = math.ceil(config.iterations * config.self_training_after)
    order: list[int] = []
    for step in range(config.iterations):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * (1 - step / config.iterations) ** config.power
        picks = []
        for _ in range(config.batch_size):
            if not order:
                order = list(rng.permutation(len(images)))
            picks.append(images[order.pop()])
        batch = _make_batch(picks, augment_config, rng, device)
        needs_clip = net.needs_clip_features or (step < switch and teacher.needs_clip)
        if needs_clip:
            batch.clip_features, batch.clip_keys = _clip_features(segmenter, batch.pixels)
        phase = "teacher" if step < switch else "self-training"
        with torch.no_grad():
            if phase == "teacher":
                pseudo = teacher.pseudo_labels(batch)
            else:
                net.eval()
                pseudo = _upsampled(net(batch.pixels, batch.clip_features), batch.pixels).argmax(1)
                net.train()
        target = torch.where(batch.human >= 0, batch.human, pseudo)
        target = torch.where(batch.valid, target, IGNORE)
        logits = _upsampled(net(batch.pixels, batch.clip_features), batch.pixels)
        loss = F.cross_entropy(logits, target, ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            optimizer.step()
        if progress is not None:
            progress(
                {
                    "step": step + 1,
                    "iterations": config.iterations,
                    "loss": loss.item(),
                    "phase": phase,
                    "lr": optimizer.param_groups[0]["lr"],
                }
            )
    net.eval().requires_grad_(False)
    return net


@torch.no_grad()
def _clip_features(segmenter: Segmenter, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen CLIP dense features and keys of a 0..1 batch, usable as inputs to a trained network."""
    if segmenter.clip.device.type == "cpu" and pixels.shape[0] > 1:  # as Segmenter.dense_features_and_keys
        parts = [_clip_features(segmenter, one[None]) for one in pixels]
        return torch.cat([f for f, _ in parts]), torch.cat([k for _, k in parts])
    normalized = ((pixels - segmenter._mean) / segmenter._std).to(segmenter.clip.dtype)
    with segmenter.clip.autocast():  # as when serving: the CLIP backbone in its precision, the student in float32
        features, keys = dense_features(segmenter.clip.visual, normalized, segmenter.options.dense_mode)
    return features.float(), keys.float()


def _upsampled(logits: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    return F.interpolate(logits, size=pixels.shape[-2:], mode="bilinear", align_corners=False)


def _make_batch(picks: list[TrainingImage], config: AugmentConfig, rng: np.random.Generator, device) -> Batch:
    pixels, maps = [], []
    for item in picks:
        height, width = item.image.shape[:2]
        blank = np.full((height, width), IGNORE, dtype=np.int64)
        stack = np.stack(
            [
                item.labels if item.labels is not None else blank,
                item.hint if item.hint is not None else blank,
                np.zeros((height, width), dtype=np.int64),  # 0 inside the image, -1 on padding after augmentation
            ]
        )
        x, m = augment(item.image, stack, config, rng)
        pixels.append(x)
        maps.append(m)
    pixels_t = torch.stack(pixels).to(device)
    maps_t = torch.stack(maps).to(device)
    return Batch(pixels=pixels_t, human=maps_t[:, 0], hint=maps_t[:, 1], valid=maps_t[:, 2] >= 0)


def evaluate(predict: Callable[[np.ndarray], np.ndarray], images: Sequence[TrainingImage], num_classes: int) -> Scores:
    """mIoU of ``predict(image) -> HxW label map`` against the images' human labels (unannotated pixels ignored)."""
    total = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
    for item in images:
        if item.labels is None:
            continue
        total += confusion_matrix(predict(item.image), item.labels, num_classes)
    return scores(total)
