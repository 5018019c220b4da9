"""Predictions for Label Studio tasks: fetch images, segment them (the backbone only for images the feature
store does not hold), shape the results."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from maskclip_engine import LabelSet, SegmentationResult, Segmenter
from maskclip_engine.students.checkpoint import StudentCheckpoint
from maskclip_engine.students.registry import ModelRegistry, StudentVersion
from maskclip_engine.students.serving import StudentSegmenter
from maskclip_service.device_lock import device_lock, set_torch_threads
from maskclip_service.prometheus import Metrics
from maskclip_service.settings import Settings
from maskclip_service.warmup import TextWarmup

from .auth import LabelStudioAuth
from .connection import label_studio_target
from .errors import ImageFetchError
from .fetching import ImageFetcher
from .label_config import LabelControl, ProjectSchema
from .project_links import ProjectLink, ProjectLinks
from .regions import brush_region, polygon_regions
from .smart_tools import InteractiveAnnotator, context_regions, parse_gestures
from .versions import is_student_version, maskclip_version, model_version

log = logging.getLogger(__name__)


class Predictor:
    """Owns the loaded model; thread-safe. Built once per process."""

    def __init__(self, segmenter: Segmenter, settings: Settings, metrics: Metrics | None = None) -> None:
        self.segmenter = segmenter
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.options = settings.segment
        # MaskCLIP's version without the label set; each project's adds its labels (maskclip_version).
        self.base_version = model_version(segmenter.clip.model_id, segmenter.clip.weights_id, self.options)
        self.registry = ModelRegistry(settings.model_dir)
        # Loaded students, least recently used first; at most settings.student_cache_size stay in memory.
        self._students: OrderedDict[Path, tuple[float, StudentSegmenter]] = OrderedDict()
        self.projects = ProjectLinks(settings.model_dir)  # shared by every replica and worker
        # One fetcher (its session and connection pool) per Label Studio host and key, reused by every request.
        self._fetchers: dict[tuple[str, str | None] | None, ImageFetcher] = {}
        self._default_fetcher = ImageFetcher(settings, None)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=settings.fetch_threads, thread_name_prefix="fetch")
        set_torch_threads(settings.torch_threads)
        self._device_lock = device_lock(segmenter.clip.device)
        # Half the memory budget keeps dense states for gestures; the segmenter's feature level has the other half.
        self.interactive = InteractiveAnnotator(segmenter, settings.feature_cache_mb / 2, self._device_lock)
        self.warmup = TextWarmup(segmenter, settings.max_warmups, settings.warmup_queue, self._device_lock)

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None = None) -> Predictor:
        return cls(settings.build_segmenter(), settings, metrics)

    # ------------------------------------------------------------ projects
    def link_project(self, project: str, link: ProjectLink) -> None:
        self.projects.save(project, link)

    def project_link(self, project: str) -> ProjectLink | None:
        return self.projects.load(project)

    def warm_text_cache(self, schema: ProjectSchema) -> Future:
        """Compute a project's label embeddings in the background so the first prediction is fast.

        Bounded (see :class:`TextWarmup`): raises ``WarmupBusyError`` (429) in a flood of new configs.
        """
        return self.warmup.submit(schema.texts)

    def fetcher_for(self, project: str | None) -> ImageFetcher:
        """The image fetcher for ``project``'s Label Studio (:func:`.connection.label_studio_target`)."""
        target = label_studio_target(self.settings, project, self.projects)
        if target is None:
            return self._default_fetcher
        with self._lock:
            fetcher = self._fetchers.get(target)
            if fetcher is None:
                fetcher = self._fetchers[target] = ImageFetcher(self.settings, LabelStudioAuth(*target))
            return fetcher

    def maskclip_version(self, schema: ProjectSchema | None) -> str:
        """The version of MaskCLIP's proposals for a project with this labeling config."""
        return maskclip_version(self.base_version, schema)

    # ------------------------------------------------------------ students
    def student_for(
        self, project: str | None, control: LabelControl, requested: str | None = None
    ) -> tuple[str, StudentSegmenter] | None:
        """The project's active student (or the ``requested`` version) if it was trained for ``control``."""
        if not project or (requested and not is_student_version(requested)):
            return None
        version = self.registry.find(project, requested) if requested else self.registry.active(project)
        if version is None:
            return None
        student = self._load_student(version)
        info = student.checkpoint.info
        if student.labels != list(control.labels) or info.get("from_name", control.from_name) != control.from_name:
            return None  # the labels changed since it was trained: MaskCLIP serves until a new student exists
        if student.checkpoint.prompts != [list(p) for p in control.prompts]:
            return None  # so did the synonyms, which its classifier embeds: the same rule applies
        return version.name, student

    def _load_student(self, version: StudentVersion) -> StudentSegmenter:
        mtime = version.checkpoint.stat().st_mtime
        with self._lock:
            cached = self._students.get(version.checkpoint)
            if cached is not None and cached[0] == mtime:
                self._students.move_to_end(version.checkpoint)
                return cached[1]
        student = StudentSegmenter(
            self.segmenter, StudentCheckpoint.load(version.checkpoint, self.segmenter.clip.device)
        )
        with self._lock:
            self._students[version.checkpoint] = (mtime, student)
            self._students.move_to_end(version.checkpoint)
            while len(self._students) > self.settings.student_cache_size:
                self._students.popitem(last=False)
        return student

    def project_version(self, project: str | None, schema: ProjectSchema | None) -> str:
        """The version that predictions for ``project`` come from now."""
        if project and schema is not None:
            served = self.student_for(project, schema.controls[0])
            if served is not None:
                return served[0]
        return self.maskclip_version(schema)

    def versions(self, project: str | None, schemas: dict[str, ProjectSchema] | None = None) -> list[dict]:
        """MaskCLIP's versions and the students of ``project``, or of every project when none is named.

        ``schemas`` are the known projects' parsed configs: MaskCLIP's version
        names each project's label set. Label Studio 1.23 asks ``GET
        /versions`` without saying which project it means, so then every
        project's versions are listed (student versions name their project:
        ``student-p12-v3``).
        """
        schemas = schemas or {}
        students = [v.to_dict() for v in self.registry.versions(project)] if project else self.registry.all_versions()
        if project:
            mine = schemas.get(project)
            versions = [self.maskclip_version(mine)]
            active = not any(s["active"] for s in students)
        else:
            versions = list(dict.fromkeys([self.maskclip_version(s) for s in schemas.values()])) or [self.base_version]
            active = True
        base = [{"version": v, "model": "maskclip", "active": active} for v in versions]
        return [*base, *students]

    # ------------------------------------------------------------ predict
    def predict_context(
        self,
        tasks: list[Any],
        schema: ProjectSchema,
        context: Any,
        project: str | None = None,
        requested: str | None = None,
    ) -> list[dict]:
        """Interactive pre-annotation: one prediction for the first task from the regions in ``context``.

        No usable prompt (an empty context) gets one prediction without regions.
        """
        gestures = parse_gestures(context_regions(context) or [], schema)
        if not tasks:
            return []
        task = tasks[0]
        if gestures is None or not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            return [{"result": [], "score": 0.0, "model_version": self.project_version(project, schema)}]
        control = schema.output_for(gestures.to_name)
        served = self.student_for(project, control, requested)
        version, student = served if served is not None else (self.maskclip_version(schema), None)
        fetcher = self.fetcher_for(project)
        started = time.perf_counter()
        answer = self.interactive.answer(
            gestures, control, lambda key: fetcher.fetch(task["data"].get(key), task.get("id")), version, student
        )
        self.metrics.observe("maskclip_interactive_seconds", time.perf_counter() - started)
        return [answer]

    def predict(
        self, tasks: list[Any], schema: ProjectSchema, project: str | None = None, requested: str | None = None
    ) -> list[dict | list]:
        """One entry per task, in task order: a prediction, or ``[]`` for a task whose image failed.

        Label Studio 1.23 stores every prediction listed for a task; an empty
        list stores none, so that task still lacks the current version and the
        next *Retrieve Predictions* asks for it again while its neighbours keep
        theirs.
        """
        return [p if p is not None else [] for p in self.predict_tasks(tasks, schema, project, requested)]

    def predict_tasks(
        self,
        tasks: list[Any],
        schema: ProjectSchema,
        project: str | None = None,
        requested: str | None = None,
        fetcher: ImageFetcher | None = None,
    ) -> Iterator[dict | None]:
        """Predictions in task order, None for a task that failed; shared by ``/predict`` and the workers.

        Tasks go through ``predict_batch`` at a time (fetch, segment, encode,
        drop), so memory follows the batch size, not the number of tasks. The
        next batch's images are fetched and decoded on the fetch threads while
        this batch is on the device, so the device does not wait for the
        network or the decoder between batches.
        """
        started = time.perf_counter()
        fetcher = fetcher or self.fetcher_for(project)
        step = max(1, self.settings.predict_batch)
        data_keys = list(schema.data_keys)
        batches = [tasks[first : first + step] for first in range(0, len(tasks), step)]
        pending = self._start_fetch(batches[0], data_keys, fetcher) if batches else None
        for number, batch in enumerate(batches):
            fetched = self._collect(batch, pending)
            # Started before this batch's segmentation, collected after it.
            following = batches[number + 1] if number + 1 < len(batches) else None
            pending = self._start_fetch(following, data_keys, fetcher) if following is not None else None
            yield from self._predict_batch(batch, fetched, schema, project, requested)
        self.metrics.observe("maskclip_predict_seconds", time.perf_counter() - started)

    def _start_fetch(self, tasks: list[Any], data_keys: list[str], fetcher: ImageFetcher):
        """Submit every image of ``tasks`` to the fetch threads: ``(futures by (task, key), failures)``."""
        failures: dict[int, str] = {}
        jobs = {}
        for index, task in enumerate(tasks):
            if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
                failures[index] = "the task has no 'data' object"
                continue
            for key in data_keys:
                jobs[(index, key)] = self._pool.submit(fetcher.fetch, task["data"].get(key), task.get("id"))
        return jobs, failures

    def _collect(self, tasks: list[Any], pending):
        """The images :meth:`_start_fetch` fetched, and why each task without them has none."""
        jobs, failures = pending
        images: dict[tuple[int, str], np.ndarray] = {}
        for (index, key), future in jobs.items():
            try:
                images[(index, key)] = future.result()
            except ImageFetchError as exc:
                failures.setdefault(index, str(exc))
            except Exception as exc:  # never let one task fail its neighbours
                log.exception("unexpected error fetching task %s", _task_id(tasks[index]))
                failures.setdefault(index, f"unexpected error: {exc.__class__.__name__}")
        for index, reason in failures.items():
            log.warning("task %s gets no prediction: %s", _task_id(tasks[index]), reason)
            self.metrics.count("maskclip_task_failures_total", reason=_reason_kind(reason))
        return images, failures

    def _predict_batch(
        self,
        tasks: list[Any],
        fetched: tuple[dict[tuple[int, str], np.ndarray], dict[int, str]],
        schema: ProjectSchema,
        project: str | None,
        requested: str | None,
    ) -> list[dict | None]:
        images, failures = fetched
        regions: dict[int, list[dict]] = {i: [] for i in range(len(tasks)) if i not in failures}
        scores: dict[int, list[float]] = {i: [] for i in regions}  # the task scores of each image it shows
        version = self.maskclip_version(schema)
        for control in schema.controls:
            order = [i for i in regions if (i, control.data_key) in images]
            if not order:
                continue
            batch = [images.pop((i, control.data_key)) for i in order]
            version, results = self._segment(batch, control, version, self.student_for(project, control, requested))
            del batch
            for index, result in zip(order, results):
                regions[index] += _regions(control, result)
                scores[index].append(result.task_scores.get(self.settings.task_score, 0.0))
        self.metrics.count("maskclip_tasks_predicted_total", value=len(regions))
        return [
            {
                "result": regions[index],
                # What Label Studio's Prediction score column averages: sorted ascending, uncertain tasks first.
                "score": round(float(np.mean(scores[index])), 4) if scores[index] else 0.0,
                "model_version": version,
            }
            if index in regions
            else None
            for index in range(len(tasks))
        ]

    def _segment(
        self,
        batch: list[np.ndarray],
        control: LabelControl,
        version: str,
        served: tuple[str, StudentSegmenter] | None,
    ) -> tuple[str, list[SegmentationResult]]:
        """One control's images through its model (the student when one serves it); returns the version used."""
        waited = time.perf_counter()
        with self._device_lock:  # one model call per device at a time: see maskclip_service/device_lock.py
            self.metrics.observe("maskclip_inference_wait_seconds", time.perf_counter() - waited)
            if self.interactive.cache.enabled:  # the same pass keeps each image's dense state for clicks
                version, student = served if served is not None else (version, None)
                return version, self.interactive.segment(batch, control, version, student, self.options.bg_threshold)
            if served is not None:
                version, student = served
                return version, student.segment_batch(batch, bg_threshold=self.options.bg_threshold)
            labelset = LabelSet.parse([list(p) for p in control.prompts])
            return version, self.segmenter.segment_batch(batch, labelset)


def _regions(control: LabelControl, result: SegmentationResult) -> list[dict]:
    """One region per present label; each region's score is that label's confidence."""
    found = []
    for name, mask in result.masks.items():
        score = result.scores[result.labels.index(name)]
        if control.result_type == "brushlabels":
            found.append(brush_region(control, name, mask, score))
        else:
            found += polygon_regions(control, name, mask, score)
    return found


def _task_id(task: Any) -> Any:
    return task.get("id") if isinstance(task, dict) else None


def _reason_kind(reason: str) -> str:
    for word, kind in (
        ("MASKCLIP_ALLOWED_HOSTS", "host_not_allowed"),
        ("HTTP", "http_error"),
        ("limit", "too_large"),
        ("decode", "undecodable"),
        ("readable", "undecodable"),
    ):
        if word in reason:
            return kind
    return "other"
