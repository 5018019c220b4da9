"""The training job: a MaskCLIP+ student for a Label Studio project, judged, stored, and promoted if better.

A plain module-level function with JSON-safe arguments, so any worker host can
run it. Its steps: find the project's Label Studio, read its data (images with
their stored CLIP features, and the accepted annotations), train, judge the
candidate against the model it would replace, store it, promote it, and queue
the follow-ups (the new student's proposals everywhere, a review of the
annotations).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from rq import get_current_job

from ls_integration.errors import ProjectDataError
from ls_integration.training_data import ProjectData, read_project
from maskclip_engine import InvalidOptionError, LabelSet, Segmenter
from maskclip_engine.students.checkpoint import StudentCheckpoint
from maskclip_engine.students.gate import Verdict
from maskclip_engine.students.network import StudentConfig
from maskclip_engine.students.training import TrainConfig, train_student
from maskclip_service.settings import Settings
from maskclip_service.training_queue import release_job

from .candidate import Candidate
from .context import shared_segmenter
from .follow_ups import queue_review
from .progress import Progress
from .promotion import promote_candidate

log = logging.getLogger(__name__)


def train_project(
    project: int,
    trigger: str = "manual",
    label_studio: dict[str, str] | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train a MaskCLIP+ student for a Label Studio project and promote it if it beats the current model.

    Label Studio is found by the one rule every job follows
    (:func:`ls_integration.connection.label_studio_for`); ``label_studio``, which
    jobs queued by old versions carry, is ignored. ``options`` override fields
    of the training configuration.
    """
    if label_studio:
        log.warning("project %s: the job's own Label Studio address is ignored; the project's link is used", project)
    job = get_current_job()
    settings = Settings.from_env()
    progress = Progress(project)
    try:
        progress.update(force=True, phase="loading model")
        # Train, record and judge under this job's settings, whatever the cached model was built with.
        segmenter = shared_segmenter(settings).with_options(settings.segment)
        config = _train_config(settings, options or {})
        progress.check_owner()  # a job replaced while it waited in the queue does no work
        data = _read_project(settings, segmenter, project, config, progress)
        labels = LabelSet.parse([list(p) for p in data.control.prompts])
        checkpoint = _train(segmenter, settings, data, labels, config, trigger, progress)
        result = _judge_and_store(Candidate(project, settings, segmenter, checkpoint, labels, data, progress, job))
        if settings.review_after_training:
            result["review"] = queue_review(project, trigger="training")
        progress.update(force=True, phase="done", **result)
        log.info("project %s: %s", project, result["reason"])
        return result
    finally:
        progress.close()
        if job is not None:
            release_job(job.connection, project, job.id)


def _train_config(settings: Settings, options: dict[str, Any]) -> TrainConfig:
    base = TrainConfig(
        iterations=settings.train_iterations,
        min_iterations=settings.train_min_iterations,
        batch_size=settings.train_batch_size,
        crop=settings.train_crop,
        lr=settings.train_lr,
    )
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(options) - known
    if unknown:
        raise InvalidOptionError(f"unknown training options {sorted(unknown)}; known: {sorted(known)}")
    for name in ("scale_range", "grid_scale_range"):
        if name in options:
            options = {**options, name: tuple(options[name])}
    return dataclasses.replace(base, **options)


def _read_project(
    settings: Settings, segmenter: Segmenter, project: int, config: TrainConfig, progress: Progress
) -> ProjectData:
    """Images and accepted annotations; a ``clip`` student's CLIP features come from the feature store."""
    progress.update(force=True, phase="fetching data")
    encode = None
    if settings.student_backbone == "clip":

        def encode(image):
            return segmenter.encode(image, mode="whole")

    data = read_project(
        settings,
        project,
        short_side=max(config.crop, settings.segment.short_side),
        encode=encode,
        progress=lambda done, total: progress.update(phase="fetching data", fetched=done, tasks=total),
    )
    if not data.train:
        raise ProjectDataError(f"project {project} has no images the worker could fetch.")
    log.info(
        "project %s: %d training images (%d annotated), %d held out, %d images and %d annotations skipped",
        project,
        len(data.train),
        data.annotated - len(data.held_out),
        len(data.held_out),
        data.skipped,
        data.skipped_annotations,
    )
    return data


def _train(
    segmenter: Segmenter,
    settings: Settings,
    data: ProjectData,
    labels: LabelSet,
    config: TrainConfig,
    trigger: str,
    progress: Progress,
) -> StudentCheckpoint:
    student_config = StudentConfig(
        backbone=settings.student_backbone, backbone_weights=settings.student_backbone_weights
    )
    net = train_student(segmenter, data.train, labels, config, student_config, progress=progress.training_step)
    return StudentCheckpoint(
        net=net,
        labels=list(data.control.labels),
        prompts=[list(p) for p in data.control.prompts],
        teacher={
            "model": settings.model,
            "pretrained": settings.pretrained,
            "model_id": segmenter.clip.model_id,
            "weights_id": segmenter.clip.weights_id,
        },
        info={
            "trigger": trigger,
            "from_name": data.control.from_name,
            "backbone": student_config.backbone,
            "dense_mode": segmenter.options.dense_mode,  # also in checkpoint.options; shown by /versions
            "train": dataclasses.asdict(config),
            "images": len(data.train),
            "annotated": data.annotated,
            "held_out": len(data.held_out),
        },
        options=segmenter.options,
    )


def _judge_and_store(candidate: Candidate) -> dict[str, Any]:
    """Judge the candidate, store it as a new version, and promote it when the gate says so."""
    project, data = candidate.project, candidate.data
    candidate.progress.update(force=True, phase="evaluating")
    judged_against = candidate.registry.active_name(project)
    verdict = candidate.judge()
    candidate.checkpoint.metrics = _metrics(verdict)
    candidate.progress.check_owner()  # a replaced job stores nothing
    version = candidate.registry.add(project, candidate.checkpoint)
    promoted, reason = verdict.promoted, verdict.reason
    if promoted:
        promoted, refused = promote_candidate(candidate, version, judged_against)
        reason = refused or verdict.reason
    return {
        "project": project,
        "version": version.name,
        "promoted": promoted,
        **_metrics(verdict),
        "reason": reason,
        "skipped_images": data.skipped,  # tasks whose image could not be fetched (warned in the log)
        "skipped_annotations": data.skipped_annotations,  # annotations that could not be read
    }


def _metrics(verdict: Verdict) -> dict[str, Any]:
    return {
        "held_out_miou": verdict.candidate,
        "baseline": verdict.baseline,
        "baseline_miou": verdict.current,
        "held_out_pixels": verdict.pixels,
        "gain_low": verdict.gain_low,
        "gain_high": verdict.gain_high,
        "held_out_blocks": verdict.units,
    }
