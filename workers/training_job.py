"""RQ job functions. Plain module-level functions with JSON-safe arguments, so any worker host can run them."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from rq import get_current_job

from ls_integration.dataset import ProjectDataError, load_project
from ls_integration.fetching import ImageFetcher
from ls_integration.host_pin import pinned_host
from ls_integration.label_studio import LabelStudioAuth, origin
from ls_integration.project_store import ProjectStore
from ls_integration.queue import release_job
from ls_integration.settings import Settings
from maskclip_engine import LabelSet, Segmenter
from maskclip_engine.registry import ModelRegistry
from maskclip_engine.student import StudentCheckpoint, StudentConfig
from maskclip_engine.student_segmenter import StudentSegmenter
from maskclip_engine.training import TrainConfig, TrainingImage, evaluate, train_student

from .context import shared_segmenter
from .preannotate import queue_after_promotion
from .progress import Progress
from .promotion import promote

log = logging.getLogger(__name__)


def train_project(
    project: int,
    trigger: str = "manual",
    label_studio: dict[str, str] | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train a MaskCLIP+ student for a Label Studio project and promote it if it beats the current model.

    Label Studio is the worker's own ``LABEL_STUDIO_URL``/``LABEL_STUDIO_API_KEY``,
    else what ``/setup`` recorded for the project in the shared model folder;
    ``label_studio`` (``{"url", "token"}``) is read only for jobs queued by
    older backends. ``options`` override fields of the training configuration.
    """
    job = get_current_job()
    settings = Settings.from_env()
    progress = Progress(project)
    try:
        progress.update(force=True, phase="loading model")
        segmenter = shared_segmenter(settings)
        link = ProjectStore(settings.model_dir).load(project)
        url = settings.label_studio_url or (link.hostname if link else None) or (label_studio or {}).get("url")
        token = (
            settings.label_studio_api_key or (link.access_token if link else None) or (label_studio or {}).get("token")
        )
        if not url:
            raise ProjectDataError("the worker does not know where Label Studio is: set LABEL_STUDIO_URL.")
        pinned = None if settings.label_studio_url else pinned_host(settings.model_dir)
        if pinned is not None and origin(pinned) != origin(url):
            raise ProjectDataError(f"the job names Label Studio at {url}, but this backend is pinned to {pinned}.")
        auth = LabelStudioAuth(url, token)
        config = _train_config(settings, options or {})
        progress.check_owner()  # a job replaced while it waited in the queue does no work
        progress.update(force=True, phase="fetching data")
        data = load_project(
            auth,
            ImageFetcher(settings, auth),
            project,
            settings.holdout_fraction,
            short_side=max(config.crop, settings.segment.short_side),
        )
        if not data.train:
            raise ProjectDataError(f"project {project} has no images the worker could fetch.")
        labels = LabelSet.parse([list(p) for p in data.control.prompts])
        log.info(
            "project %s: %d training images (%d annotated), %d held out, %d images and %d annotations skipped",
            project,
            len(data.train),
            data.annotated - len(data.held_out),
            len(data.held_out),
            data.skipped,
            data.skipped_annotations,
        )
        # Train, record and judge under this job's settings, whatever the cached model was built with.
        segmenter = Segmenter(segmenter.clip, settings.segment, segmenter.text)
        student_config = StudentConfig(
            backbone=settings.student_backbone, backbone_weights=settings.student_backbone_weights
        )
        net = train_student(
            segmenter, data.train, labels, config, student_config, progress=progress.training_step
        )

        progress.update(force=True, phase="evaluating")
        registry = ModelRegistry(settings.model_dir)
        checkpoint = StudentCheckpoint(
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
        held_out, gate = data.held_out, (settings.gate_min_pixels, settings.gate_margin)
        judged_against = registry.active_name(project)
        verdict = judge(segmenter, registry, project, checkpoint, labels, held_out, *gate)
        checkpoint.metrics = {
            "held_out_miou": verdict.candidate,
            "baseline": verdict.baseline,
            "baseline_miou": verdict.current,
            "held_out_pixels": verdict.pixels,
        }
        progress.check_owner()  # a replaced job stores nothing
        version = registry.add(project, checkpoint)
        promoted, reason = verdict.promoted, verdict.reason
        if promoted:

            def rejudge() -> tuple[bool, str]:
                again = judge(segmenter, registry, project, checkpoint, labels, held_out, *gate)
                return again.promoted, again.reason

            connection, job_id = (job.connection, job.id) if job is not None else (None, None)
            promoted, refused = promote(connection, registry, version, judged_against, rejudge, job_id)
            reason = refused or reason
            if promoted:  # not when activation found a newer job or a better model
                queue_after_promotion(project, version.name)  # the student's proposals everywhere
        result = {
            "project": project,
            "version": version.name,
            "promoted": promoted,
            "held_out_miou": verdict.candidate,
            "baseline": verdict.baseline,
            "baseline_miou": verdict.current,
            "held_out_pixels": verdict.pixels,
            "reason": reason,
            "skipped_images": data.skipped,  # tasks whose image could not be fetched (warned in the log)
            "skipped_annotations": data.skipped_annotations,  # annotations that could not be read
        }
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
        batch_size=settings.train_batch_size,
        crop=settings.train_crop,
        lr=settings.train_lr,
    )
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"unknown training options {sorted(unknown)}; known: {sorted(known)}")
    if "scale_range" in options:
        options = {**options, "scale_range": tuple(options["scale_range"])}
    return dataclasses.replace(base, **options)


@dataclass(frozen=True)
class Verdict:
    """The gate's decision. ``pixels``: labelled held-out pixels both sides were scored on."""

    promoted: bool
    reason: str
    candidate: float | None = None
    current: float | None = None
    baseline: str = "maskclip"
    pixels: int = 0


def judge(
    segmenter: Segmenter,
    registry: ModelRegistry,
    project: int,
    checkpoint: StudentCheckpoint,
    labels: LabelSet,
    held_out: list[TrainingImage],
    min_pixels: int,
    margin: float,
) -> Verdict:
    """Score the candidate and the model it would replace (the active student, else MaskCLIP) on held-out images.

    Both sides are scored as the backend serves them: MaskCLIP with
    ``segmenter.options`` (the serving options, background threshold included),
    a student with the dense mode it records and the serving background
    threshold. The candidate is promoted only when at least ``min_pixels``
    labelled pixels were held out and its mIoU exceeds the current model's by
    more than ``margin``: a tie, or a gain within the margin, keeps the current
    model (replacing a model for noise would change every later prediction).
    """
    options = segmenter.options
    active = registry.active(project)
    baseline_name, baseline = "maskclip", None
    if active is not None:
        previous = StudentCheckpoint.load(active.checkpoint, segmenter.clip.device)
        if previous.labels == checkpoint.labels and previous.prompts == checkpoint.prompts:
            baseline_name, baseline = active.name, StudentSegmenter(segmenter, previous)
    if not held_out:
        return Verdict(
            False,
            "kept, not promoted: at least two accepted annotations are needed to hold one out for judging",
            baseline=baseline_name,
        )
    num = len(checkpoint.labels)
    candidate = StudentSegmenter(segmenter, checkpoint)
    scored = evaluate(lambda image: candidate.segment(image, options.bg_threshold).label_map, held_out, num)
    if baseline is None:
        current = evaluate(lambda image: segmenter.segment(image, labels).label_map, held_out, num)
    else:
        current = evaluate(lambda image: baseline.segment(image, options.bg_threshold).label_map, held_out, num)
    new, old, pixels = scored.miou, current.miou, scored.pixels
    if pixels < min_pixels:
        promoted = False
        reason = (
            f"kept, not promoted: only {pixels} labelled pixels were held out and MASKCLIP_GATE_MIN_PIXELS asks for "
            f"{min_pixels} (held-out mIoU {new:.3f} against {old:.3f}); annotate more images"
        )
    elif new > old + margin:
        promoted = True
        reason = f"promoted: held-out mIoU {new:.3f} beats {old:.3f} by more than {margin:g} on {pixels} pixels"
    else:
        promoted = False
        reason = (
            f"kept, not promoted: held-out mIoU {new:.3f} does not beat {old:.3f} by more than "
            f"MASKCLIP_GATE_MARGIN={margin:g}"
        )
    return Verdict(promoted, reason, new, old, baseline_name, pixels)
