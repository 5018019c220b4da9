"""Scoring a project's models against its own accepted annotations: ``maskclip eval-project`` as a job function.

``eval_project`` takes JSON-safe arguments and returns a JSON-safe report, so
it can run under the CLI (which prints its table) or on any worker.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ls_integration.errors import ProjectDataError
from ls_integration.training_data import read_project
from maskclip_engine.evaluation.evaluate import (
    EvalConfig,
    Sample,
    config_predictor,
    evaluate_configs,
    report_json,
    report_table,
)
from maskclip_engine.students.registry import ModelRegistry
from maskclip_service.settings import Settings

from .context import shared_segmenter

log = logging.getLogger(__name__)

Progress = Callable[[Iterable], Iterable]


def eval_project(
    project: int, configs: list[str] | None = None, out: str | None = None, progress: Progress | None = None
) -> dict[str, Any]:
    """mIoU of each configuration (``maskclip eval``'s syntax; default: MaskCLIP and the active student) on the
    project's annotated images. Returns the report (``project``, ``samples``, ``classes``, ``results``) with its
    terminal ``table``; ``out`` also writes the report there as JSON. ``progress`` wraps the images' iterable
    (a terminal bar)."""
    settings = Settings.from_env()
    segmenter = shared_segmenter(settings)
    data = read_project(settings, project, short_side=settings.segment.short_side)
    samples = [
        Sample(f"image {i}", item.image, item.labels)
        for i, item in enumerate(data.train + data.held_out)
        if item.labels is not None
    ]
    if not samples:
        raise ProjectDataError(f"project {project} has no accepted annotations to evaluate against.")
    classes = ["|".join(prompts) for prompts in data.control.prompts]
    parsed = [EvalConfig.parse(text) for text in configs or []]
    if not parsed:
        parsed = [EvalConfig(settings.segment.dense_mode)]
        active = ModelRegistry(settings.model_dir).active(project)
        if active is not None:
            parsed.append(EvalConfig(active.name, student=str(active.checkpoint)))
    predictors = {c.name: config_predictor(segmenter, c, classes, "none", 0.0) for c in parsed}
    results = evaluate_configs(predictors, samples, len(classes), progress=progress or (lambda it: it))
    document = report_json(results, classes, project=project, samples=len(samples))
    if out is not None:
        Path(out).write_text(document)
    log.info("project %s: %d configurations scored on %d annotated images", project, len(parsed), len(samples))
    return {**json.loads(document), "table": report_table(results, classes)}
