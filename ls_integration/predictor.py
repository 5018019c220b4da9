"""Predictions for Label Studio tasks: fetch images, segment them, shape the results."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from maskclip_engine import LabelSet, SegmentationResult, Segmenter, SegmentOptions
from maskclip_engine.registry import ModelRegistry, StudentVersion
from maskclip_engine.student import StudentCheckpoint
from maskclip_engine.student_segmenter import StudentSegmenter

from .errors import ImageFetchError
from .fetching import ImageFetcher
from .inference import device_lock, set_torch_threads
from .interactive import InteractiveAnnotator, context_regions, parse_gestures
from .label_config import LabelControl, ProjectSchema
from .label_studio import LabelStudioAuth
from .metrics import Metrics
from .project_store import ProjectLink, ProjectStore
from .regions import brush_region, polygon_regions
from .settings import Settings
from .warmup import TextWarmup

log = logging.getLogger(__name__)


def model_version(model_id: str, weights_id: str, options: SegmentOptions) -> str:
    """A stable name for what produces the predictions, e.g. ``maskclip-ViT-B-16-openai-ks-pd``.

    Label Studio skips tasks that already hold a prediction of the current
    version, so anything that changes the masks changes the version: the
    dense mode, model, weights (tag or file hash), refinements, other
    non-default settings (a short hash), a model config file's hash, and
    QuickGELU forced onto weights that do not imply it.
    """
    name_and_config, _, flag = model_id.partition("+")
    name, _, config_hash = name_and_config.partition("@")
    kind, _, value = weights_id.partition(":")
    weights = value if kind == "tag" else f"w{value[:8]}" if value else kind
    parts = [options.dense_mode, name.replace("/", "-"), weights]
    if options.key_smoothing:
        parts.append("ks")
    if options.prompt_denoising:
        parts.append("pd")
    named = ("key_smoothing", "prompt_denoising", "batch_size", "dense_mode")
    rest = {k: v for k, v in options.to_dict().items() if k not in named}
    defaults = {k: v for k, v in SegmentOptions().to_dict().items() if k in rest}
    if rest != defaults:
        parts.append(hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()[:6])
    if config_hash:
        parts.append(config_hash[:6])
    if flag == "quickgelu" and kind != "tag":
        parts.append("qg")
    return "-".join(parts)


class Predictor:
    """Owns the loaded model; thread-safe. Built once per process."""

    def __init__(self, segmenter: Segmenter, settings: Settings, metrics: Metrics | None = None) -> None:
        self.segmenter = segmenter
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.options = settings.segment
        self.version = model_version(segmenter.clip.model_id, segmenter.clip.weights_id, self.options)
        self._default_auth = (
            LabelStudioAuth(settings.label_studio_url, settings.label_studio_api_key)
            if settings.label_studio_url
            else None
        )
        self.registry = ModelRegistry(settings.model_dir)
        # Loaded students, least recently used first; at most settings.student_cache_size stay in memory.
        self._students: OrderedDict[Path, tuple[float, StudentSegmenter]] = OrderedDict()
        self.projects = ProjectStore(settings.model_dir)  # shared by every replica and worker
        # One fetcher (its session and connection pool) per Label Studio host and key, reused by every request.
        self._fetchers: dict[tuple[str, str | None] | None, ImageFetcher] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=settings.fetch_threads, thread_name_prefix="fetch")
        set_torch_threads(settings.torch_threads)
        self._device_lock = device_lock(segmenter.clip.device)
        self.interactive = InteractiveAnnotator(segmenter, settings.feature_cache_mb, self._device_lock)
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
        return self.warmup.submit(schema)

    def fetcher_for(self, project: str | None) -> ImageFetcher:
        link = self.project_link(project) if project and self._default_auth is None else None
        key = (link.hostname, link.access_token) if link is not None and link.hostname else None
        with self._lock:
            fetcher = self._fetchers.get(key)
            if fetcher is None:
                auth = LabelStudioAuth(*key) if key is not None else self._default_auth
                fetcher = self._fetchers[key] = ImageFetcher(self.settings, auth)
            return fetcher

    # ------------------------------------------------------------ students
    def student_for(
        self, project: str | None, control: LabelControl, requested: str | None = None
    ) -> tuple[str, StudentSegmenter] | None:
        """The project's active student (or the ``requested`` version) if it was trained for ``control``."""
        if not project or requested == self.version:
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
        return self.version

    def versions(self, project: str | None) -> list[dict]:
        """MaskCLIP's version and the students of ``project``, or of every project when none is named.

        Label Studio 1.23 asks ``GET /versions`` without saying which project it
        means; student versions name their project (``student-p12-v3``).
        """
        students = [v.to_dict() for v in self.registry.versions(project)] if project else self.registry.all_versions()
        base = {
            "version": self.version,
            "model": "maskclip",
            "active": not (project and any(s["active"] for s in students)),
        }
        return [base, *students]

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
        version, student = served if served is not None else (self.version, None)
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
        drop), so memory follows the batch size, not the number of tasks.
        """
        started = time.perf_counter()
        fetcher = fetcher or self.fetcher_for(project)
        step = max(1, self.settings.predict_batch)
        for first in range(0, len(tasks), step):
            yield from self._predict_batch(tasks[first : first + step], schema, project, requested, fetcher)
        self.metrics.observe("maskclip_predict_seconds", time.perf_counter() - started)

    def _fetch(self, tasks: list[Any], data_keys: list[str], fetcher: ImageFetcher):
        images: dict[tuple[int, str], np.ndarray] = {}
        failures: dict[int, str] = {}
        jobs = {}
        for index, task in enumerate(tasks):
            if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
                failures[index] = "the task has no 'data' object"
                continue
            for key in data_keys:
                jobs[(index, key)] = self._pool.submit(fetcher.fetch, task["data"].get(key), task.get("id"))
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
        schema: ProjectSchema,
        project: str | None,
        requested: str | None,
        fetcher: ImageFetcher,
    ) -> list[dict | None]:
        images, failures = self._fetch(tasks, list(schema.data_keys), fetcher)
        regions: dict[int, list[dict]] = {i: [] for i in range(len(tasks)) if i not in failures}
        scores: dict[int, list[float]] = {i: [] for i in regions}
        version = self.version
        for control in schema.controls:
            order = [i for i in regions if (i, control.data_key) in images]
            if not order:
                continue
            batch = [images.pop((i, control.data_key)) for i in order]
            served = self.student_for(project, control, requested)
            waited = time.perf_counter()
            with self._device_lock:  # one model call per device at a time: see ls_integration/inference.py
                self.metrics.observe("maskclip_inference_wait_seconds", time.perf_counter() - waited)
                if self.interactive.cache.enabled:  # the same forward pass keeps each image's state for clicks
                    version, student = served if served is not None else (version, None)
                    results = self.interactive.segment(batch, control, version, student, self.options.bg_threshold)
                elif served is not None:
                    version, student = served
                    results = student.segment_batch(batch, bg_threshold=self.options.bg_threshold)
                else:
                    labelset = LabelSet.parse([list(p) for p in control.prompts])
                    results = self.segmenter.segment_batch(batch, labelset)
            del batch
            for index, result in zip(order, results):
                found = _regions(control, result)
                regions[index] += [region for region, _ in found]
                scores[index] += [score for _, score in found]
        self.metrics.count("maskclip_tasks_predicted_total", value=len(regions))
        out: list[dict | None] = []
        for index in range(len(tasks)):
            if index not in regions:
                out.append(None)
                continue
            task_scores = scores[index]
            out.append(
                {
                    "result": regions[index],
                    "score": round(float(np.mean(task_scores)), 4) if task_scores else 0.0,
                    "model_version": version,
                }
            )
        return out


def _regions(control: LabelControl, result: SegmentationResult) -> list[tuple[dict, float]]:
    found = []
    for name, mask in result.masks.items():
        score = result.scores[result.labels.index(name)]
        if control.result_type == "brushlabels":
            found.append((brush_region(control, name, mask, score), score))
        else:
            found += [(region, score) for region in polygon_regions(control, name, mask, score)]
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
