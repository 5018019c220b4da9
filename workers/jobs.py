"""RQ job functions. Plain module-level functions with JSON-safe arguments, so any worker host can run them."""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
from typing import Any

from rq import get_current_job
from tqdm import tqdm

from ls_integration.dataset import ProjectDataError, load_project
from ls_integration.fetching import ImageFetcher
from ls_integration.label_studio import LabelStudioAuth
from ls_integration.queue import HEARTBEAT_S, release_job
from ls_integration.settings import Settings
from maskclip_engine import LabelSet, Segmenter
from maskclip_engine.registry import ModelRegistry
from maskclip_engine.student import StudentCheckpoint, StudentConfig
from maskclip_engine.student_segmenter import StudentSegmenter
from maskclip_engine.training import TrainConfig, TrainingImage, evaluate, train_student

from .context import shared_segmenter

log = logging.getLogger(__name__)


class Progress:
    """Reports a job's progress to the RQ job's meta (at most once a second), the log and a terminal bar.

    A heartbeat in the meta, refreshed every few seconds from a background
    thread, lets triggers tell a running job from one whose worker died.
    """

    def __init__(self, project: int, total: int | None = None) -> None:
        self.job = get_current_job()
        self.project = project
        self.meta: dict[str, Any] = {}
        self._saved = 0.0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._bar = tqdm(total=total, desc=f"training project {project}", unit="step") if sys.stderr.isatty() else None
        if self.job is not None:
            threading.Thread(target=self._beat, name="job-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        while not self._stopped.wait(HEARTBEAT_S):
            self.update(force=True)

    def update(self, force: bool = False, **fields: Any) -> None:
        with self._lock:
            self._update(force, fields)

    def _update(self, force: bool, fields: dict[str, Any]) -> None:
        self.meta.update(fields, heartbeat=time.time())
        if self._bar is not None and "step" in fields:
            self._bar.total = fields.get("iterations", self._bar.total)
            self._bar.n = fields["step"]
            self._bar.set_postfix(loss=f"{fields.get('loss', 0):.3f}", phase=fields.get("phase"), refresh=True)
        now = time.monotonic()
        if self.job is not None and (force or now - self._saved >= 1.0):
            self.job.meta.update(self.meta)
            self.job.save_meta()
            self._saved = now
        step = fields.get("step")
        if step is not None and (step == 1 or step % 50 == 0 or step == fields.get("iterations")):
            log.info(
                "project %s: step %s/%s loss %.4f (%s)",
                self.project,
                step,
                fields.get("iterations"),
                fields.get("loss", float("nan")),
                fields.get("phase"),
            )

    def close(self) -> None:
        self._stopped.set()
        if self._bar is not None:
            self._bar.close()


def train_project(
    project: int,
    trigger: str = "manual",
    label_studio: dict[str, str] | None = None,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train a MaskCLIP+ student for a Label Studio project and promote it if it beats the current model.

    ``label_studio`` (``{"url", "token"}``) is used when the worker's own
    ``LABEL_STUDIO_URL``/``LABEL_STUDIO_API_KEY`` are not set; ``options``
    override fields of the training configuration.
    """
    job = get_current_job()
    settings = Settings.from_env()
    progress = Progress(project)
    try:
        progress.update(force=True, phase="loading model")
        segmenter = shared_segmenter(settings)
        url = settings.label_studio_url or (label_studio or {}).get("url")
        token = settings.label_studio_api_key or (label_studio or {}).get("token")
        if not url:
            raise ProjectDataError("the worker does not know where Label Studio is: set LABEL_STUDIO_URL.")
        auth = LabelStudioAuth(url, token)
        config = _train_config(settings, options or {})
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
            "project %s: %d training images (%d annotated), %d held out, %d skipped",
            project,
            len(data.train),
            data.annotated - len(data.held_out),
            len(data.held_out),
            data.skipped,
        )
        student_config = StudentConfig(backbone=settings.student_backbone)
        net = train_student(
            segmenter, data.train, labels, config, student_config, progress=lambda fields: progress.update(**fields)
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
                "train": dataclasses.asdict(config),
                "images": len(data.train),
                "annotated": data.annotated,
                "held_out": len(data.held_out),
            },
        )
        candidate, current, current_name = _judge(segmenter, registry, project, checkpoint, labels, data.held_out)
        checkpoint.metrics = {"held_out_miou": candidate, "baseline": current_name, "baseline_miou": current}
        version = registry.add(project, checkpoint)
        promoted = candidate is not None and current is not None and candidate > current
        if promoted:
            registry.activate(version)
        result = {
            "project": project,
            "version": version.name,
            "promoted": promoted,
            "held_out_miou": candidate,
            "baseline": current_name,
            "baseline_miou": current,
            "reason": _reason(candidate, current, promoted),
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


def _judge(
    segmenter: Segmenter,
    registry: ModelRegistry,
    project: int,
    checkpoint: StudentCheckpoint,
    labels: LabelSet,
    held_out: list[TrainingImage],
) -> tuple[float | None, float | None, str]:
    """Held-out mIoU of the candidate and of the model it would replace (the active student, else MaskCLIP)."""
    active = registry.active(project)
    baseline_name = "maskclip"
    baseline = None
    if active is not None:
        previous = StudentCheckpoint.load(active.checkpoint, segmenter.clip.device)
        if previous.labels == checkpoint.labels:
            baseline_name, baseline = active.name, StudentSegmenter(segmenter, previous)
    if not held_out:
        return None, None, baseline_name
    candidate = StudentSegmenter(segmenter, checkpoint)
    num = len(checkpoint.labels)
    candidate_miou = evaluate(lambda image: candidate.segment(image).label_map, held_out, num).miou
    if baseline is None:
        current = evaluate(lambda image: segmenter.segment(image, labels).label_map, held_out, num).miou
    else:
        current = evaluate(lambda image: baseline.segment(image).label_map, held_out, num).miou
    return candidate_miou, current, baseline_name


def _reason(candidate: float | None, current: float | None, promoted: bool) -> str:
    if candidate is None:
        return "kept, not promoted: at least two accepted annotations are needed to hold one out for judging"
    if promoted:
        return f"promoted: held-out mIoU {candidate:.3f} beats {current:.3f}"
    return f"kept, not promoted: held-out mIoU {candidate:.3f} does not beat {current:.3f}"
