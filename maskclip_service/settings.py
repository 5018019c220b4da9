"""Backend and worker configuration, read once from environment variables.

Every setting is one field of :class:`Settings` and one variable of
:data:`ENVIRONMENT` (docs/configuration.md lists them with their meaning).
The same names work for ``maskclip-backend serve``, under gunicorn, and for
``maskclip-worker``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maskclip_engine import SegmentOptions  # torch-free: the gunicorn master reads settings without torch
from maskclip_engine.config import PRECISIONS

if TYPE_CHECKING:
    from maskclip_engine import Segmenter

from . import defaults
from .errors import ConfigurationError
from .origins import allowed_origin


def _bool(name: str, raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"{name}={raw!r} is not a boolean; use true or false.")


def _parse(name: str, raw: str, kind: str) -> Any:
    """One variable's text as ``kind``: str, int, float, bool, path or hosts (a comma-separated list)."""
    if kind == "bool":
        return _bool(name, raw)
    if kind in ("int", "float"):
        try:
            return int(raw) if kind == "int" else float(raw)
        except ValueError:
            raise ConfigurationError(f"{name}={raw!r} is not a {'whole ' if kind == 'int' else ''}number.") from None
    if kind == "path":
        return Path(raw)
    if kind == "hosts":
        return tuple(h.strip().lower() for h in raw.split(",") if h.strip())
    return raw


# Settings field -> (environment variable, kind). Empty variables keep the default.
ENVIRONMENT: dict[str, tuple[str, str]] = {
    "model": ("MASKCLIP_MODEL", "str"),
    "pretrained": ("MASKCLIP_PRETRAINED", "str"),
    "device": ("MASKCLIP_DEVICE", "str"),
    "precision": ("MASKCLIP_PRECISION", "str"),
    "label_studio_url": ("LABEL_STUDIO_URL", "str"),
    "label_studio_api_key": ("LABEL_STUDIO_API_KEY", "str"),
    "local_files_root": ("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT", "path"),
    "allowed_hosts": ("MASKCLIP_ALLOWED_HOSTS", "hosts"),
    "model_dir": ("MODEL_DIR", "path"),
    "cache_dir": ("MASKCLIP_CACHE_DIR", "path"),
    "feature_store": ("MASKCLIP_FEATURE_STORE", "path"),
    "feature_store_gb": ("MASKCLIP_FEATURE_STORE_GB", "float"),
    "feature_cache_mb": ("MASKCLIP_FEATURE_CACHE_MB", "float"),
    "redis_url": ("REDIS_URL", "str"),
    "basic_auth_user": ("BASIC_AUTH_USER", "str"),
    "basic_auth_pass": ("BASIC_AUTH_PASS", "str"),
    "max_image_bytes": ("MASKCLIP_MAX_IMAGE_BYTES", "int"),
    "max_image_pixels": ("MASKCLIP_MAX_IMAGE_PIXELS", "int"),
    "max_labels": ("MASKCLIP_MAX_LABELS", "int"),
    "max_prompts": ("MASKCLIP_MAX_PROMPTS", "int"),
    "max_tasks": ("MASKCLIP_MAX_TASKS", "int"),
    "max_request_bytes": ("MASKCLIP_MAX_REQUEST_BYTES", "int"),
    "student_cache_size": ("MASKCLIP_STUDENT_CACHE_SIZE", "int"),
    "text_cache_entries": ("MASKCLIP_TEXT_CACHE_ENTRIES", "int"),
    "max_warmups": ("MASKCLIP_MAX_WARMUPS", "int"),
    "warmup_queue": ("MASKCLIP_WARMUP_QUEUE", "int"),
    "fetch_timeout": ("MASKCLIP_FETCH_TIMEOUT", "float"),
    "fetch_retries": ("MASKCLIP_FETCH_RETRIES", "int"),
    "queue_name": ("MASKCLIP_QUEUE", "str"),
    "train_every": ("MASKCLIP_TRAIN_EVERY", "int"),
    "train_iterations": ("MASKCLIP_TRAIN_ITERATIONS", "int"),
    "train_min_iterations": ("MASKCLIP_TRAIN_MIN_ITERATIONS", "int"),
    "train_batch_size": ("MASKCLIP_TRAIN_BATCH_SIZE", "int"),
    "train_crop": ("MASKCLIP_TRAIN_CROP", "int"),
    "train_lr": ("MASKCLIP_TRAIN_LR", "float"),
    "student_backbone": ("MASKCLIP_STUDENT_BACKBONE", "str"),
    "student_backbone_weights": ("MASKCLIP_STUDENT_BACKBONE_WEIGHTS", "str"),
    "holdout_fraction": ("MASKCLIP_HOLDOUT_FRACTION", "float"),
    "gate_margin": ("MASKCLIP_GATE_MARGIN", "float"),
    "gate_confidence": ("MASKCLIP_GATE_CONFIDENCE", "float"),
    "review_after_training": ("MASKCLIP_REVIEW_AFTER_TRAINING", "bool"),
    "job_timeout": ("MASKCLIP_JOB_TIMEOUT", "int"),
    "predict_batch": ("MASKCLIP_PREDICT_BATCH", "int"),
    "task_score": ("MASKCLIP_TASK_SCORE", "str"),
    "torch_threads": ("MASKCLIP_TORCH_THREADS", "int"),
    "preannotate_on_import": ("MASKCLIP_PREANNOTATE_ON_IMPORT", "bool"),
    "preannotate_on_label_change": ("MASKCLIP_PREANNOTATE_ON_LABEL_CHANGE", "bool"),
    "preannotate_chunk": ("MASKCLIP_PREANNOTATE_CHUNK", "int"),
    "preannotate_skip_annotated": ("MASKCLIP_PREANNOTATE_SKIP_ANNOTATED", "bool"),
    "preannotate_lease_s": ("MASKCLIP_PREANNOTATE_LEASE_S", "int"),
}

# SegmentOptions field -> (environment variable, kind): how proposals are made.
SEGMENT_ENVIRONMENT: dict[str, tuple[str, str]] = {
    "mode": ("MASKCLIP_MODE", "str"),
    "dense_mode": ("MASKCLIP_DENSE_MODE", "str"),
    "short_side": ("MASKCLIP_SHORT_SIDE", "int"),
    "crop": ("MASKCLIP_CROP", "int"),
    "stride": ("MASKCLIP_STRIDE", "int"),
    "key_smoothing": ("MASKCLIP_KEY_SMOOTHING", "bool"),
    "prompt_denoising": ("MASKCLIP_PROMPT_DENOISING", "bool"),
    "pd_threshold": ("MASKCLIP_PD_THRESHOLD", "float"),
    "bg_threshold": ("MASKCLIP_BG_THRESHOLD", "float"),
    "batch_size": ("MASKCLIP_BATCH_SIZE", "int"),
    "key_smoothing_variant": ("MASKCLIP_KS_VARIANT", "str"),
    "ks_threshold": ("MASKCLIP_KS_THRESHOLD", "float"),
    "slide_refine": ("MASKCLIP_SLIDE_REFINE", "str"),
    "pamr": ("MASKCLIP_PAMR", "bool"),
    "pamr_iterations": ("MASKCLIP_PAMR_ITERATIONS", "int"),
    "pamr_stride": ("MASKCLIP_PAMR_STRIDE", "int"),
}

_POSITIVE = (
    "max_image_bytes",
    "max_image_pixels",
    "max_labels",
    "max_prompts",
    "max_tasks",
    "max_request_bytes",
    "student_cache_size",
    "text_cache_entries",
    "max_warmups",
    "train_iterations",
    "train_min_iterations",
    "train_batch_size",
    "predict_batch",
    "preannotate_chunk",
    "preannotate_lease_s",
)


def _from_environment(table: dict[str, tuple[str, str]]) -> dict[str, Any]:
    values = {}
    for name, (variable, kind) in table.items():
        raw = os.environ.get(variable, "").strip()
        if raw:
            values[name] = _parse(variable, raw, kind)
    return values


@dataclass(frozen=True)
class Settings:
    """Everything the backend and workers need to know; ``ENVIRONMENT`` names each field's variable."""

    model: str = "ViT-B-16"
    pretrained: str = "openai"
    device: str | None = None
    precision: str = "auto"  # bf16 backbone where the chip has native bf16, else fp32
    segment: SegmentOptions = field(default_factory=SegmentOptions)
    label_studio_url: str | None = None
    label_studio_api_key: str | None = field(default=None, repr=False)
    local_files_root: Path | None = None
    allowed_hosts: tuple[str, ...] = ()
    model_dir: Path = Path("models")
    cache_dir: Path | None = None
    feature_store: Path | None = None  # None: MODEL_DIR/features
    feature_store_gb: float = 10.0  # 0 turns the store off
    feature_cache_mb: float = 512.0  # the in-memory level in front of the store, and smart-tool states (0: off)
    redis_url: str | None = None
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = field(default=None, repr=False)
    max_image_bytes: int = 50 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    max_labels: int = 1000  # labels in one config, all controls together
    max_prompts: int = 4000  # label texts plus their predicted_values synonyms, all controls together
    max_tasks: int = 1000  # tasks in one /predict request
    max_request_bytes: int = 64 * 1024 * 1024  # one request body
    student_cache_size: int = 4  # trained students kept loaded per process (least recently used dropped)
    text_cache_entries: int = 4096  # label texts whose embeddings stay in memory (LRU; the disk cache keeps all)
    max_warmups: int = 2  # label configs whose text embeddings are computed at once in the background
    warmup_queue: int = 16  # further configs waiting for a warm-up; beyond that /setup and webhooks get 429
    fetch_timeout: float = 30.0
    fetch_retries: int = 3  # connection errors and 429/5xx answers are retried this often, with backoff
    fetch_threads: int = 8
    queue_name: str = defaults.QUEUE_NAME
    train_every: int = 0  # enqueue training after this many new/updated annotations (0: only on request)
    train_iterations: int = 400
    train_min_iterations: int = 120  # the fewest steps a small project's training runs
    train_batch_size: int = 4
    train_crop: int = 320
    train_lr: float = 0.01
    student_backbone: str = "clip"
    student_backbone_weights: str | None = None  # ResNet students: a local ImageNet file, or "random"
    holdout_fraction: float = 0.2
    gate_margin: float = 0.0  # the held-out mIoU gain's lower confidence bound must exceed this
    gate_confidence: float = 0.95  # of that one-sided bound
    review_after_training: bool = True  # every training job ends with a review of the annotations
    job_timeout: int = defaults.JOB_TIMEOUT_S
    predict_batch: int = 8  # /predict fetches, segments and encodes this many tasks at a time
    task_score: str = "top1"  # a prediction's score, to sort tasks by: top1, margin, entropy or class_min
    torch_threads: int = 0  # torch intra-op threads per process (0: torch's default)
    preannotate_on_import: bool = True  # TASKS_CREATED webhooks queue pre-annotation of the new tasks
    preannotate_on_label_change: bool = True  # a label set change re-proposes every unannotated task
    preannotate_chunk: int = 32  # tasks per unit of pre-annotation work a worker takes
    preannotate_skip_annotated: bool = True  # whole-project runs leave tasks with submitted annotations alone
    preannotate_lease_s: int = defaults.LEASE_S  # a chunk whose worker is silent this long is taken over by another

    @classmethod
    def from_env(cls) -> Settings:
        try:
            segment = SegmentOptions(**_from_environment(SEGMENT_ENVIRONMENT))
        except ConfigurationError:
            raise
        except Exception as exc:  # an engine option error, reworded for the environment
            raise ConfigurationError(f"invalid MASKCLIP_* segmentation setting: {exc}") from exc
        settings = cls(segment=segment, **_from_environment(ENVIRONMENT))
        settings.validate()
        return settings

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @property
    def feature_store_dir(self) -> Path:
        """Where image features are stored: ``MASKCLIP_FEATURE_STORE``, else ``MODEL_DIR/features``."""
        return self.feature_store if self.feature_store is not None else self.model_dir / "features"

    def build_segmenter(self, memory_mb: float | None = None) -> Segmenter:
        """The MaskCLIP model these settings name, with the feature store. It loads weights: build it once per
        process. ``memory_mb`` sizes the in-memory feature level (default: ``feature_cache_mb``)."""
        from maskclip_engine import ModelSpec, Segmenter, load_clip
        from maskclip_engine.backbone.text import TextEmbedder
        from maskclip_engine.features.cache import FeatureCache
        from maskclip_engine.features.source import FeatureSource
        from maskclip_engine.features.store import FeatureStore

        clip = load_clip(
            ModelSpec(
                model=self.model,
                pretrained=self.pretrained,
                device=self.device,
                precision=self.precision,  # type: ignore[arg-type]
                cache_dir=self.cache_dir,
            )
        )
        text = TextEmbedder(clip, clip.spec.resolved_cache_dir, memory_entries=self.text_cache_entries)
        memory = FeatureCache(self.feature_cache_mb / 2 if memory_mb is None else memory_mb)
        features = FeatureSource(memory, FeatureStore.sized(self.feature_store_dir, self.feature_store_gb))
        return Segmenter(clip, self.segment, text, features)

    def validate(self) -> None:
        if self.label_studio_url and not self.label_studio_url.startswith(("http://", "https://")):
            raise ConfigurationError(f"LABEL_STUDIO_URL={self.label_studio_url!r} must start with http:// or https://.")
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise ConfigurationError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither.")
        if self.local_files_root is not None and not self.local_files_root.is_dir():
            raise ConfigurationError(
                f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={self.local_files_root} is not a folder on this machine."
            )
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"{ENVIRONMENT[name][0]} must be positive.")
        if not 0 <= self.fetch_retries <= 10:
            raise ConfigurationError("MASKCLIP_FETCH_RETRIES must be between 0 and 10.")
        if self.warmup_queue < 0:
            raise ConfigurationError("MASKCLIP_WARMUP_QUEUE must be 0 or more.")
        if self.precision not in PRECISIONS:
            raise ConfigurationError(f"MASKCLIP_PRECISION={self.precision!r}: use one of {', '.join(PRECISIONS)}.")
        for entry in self.allowed_hosts:
            try:
                allowed_origin(entry)
            except ValueError as exc:
                raise ConfigurationError(f"MASKCLIP_ALLOWED_HOSTS: {exc}.") from None
        if self.student_backbone not in ("clip", "resnet50", "resnet101"):
            raise ConfigurationError(
                f"MASKCLIP_STUDENT_BACKBONE={self.student_backbone!r}: use clip, resnet50 or resnet101."
            )
        if self.task_score not in ("top1", "margin", "entropy", "class_min"):
            raise ConfigurationError(
                f"MASKCLIP_TASK_SCORE={self.task_score!r}: use top1, margin, entropy or class_min."
            )
        self._validate_sizes_and_gate()

    def _validate_sizes_and_gate(self) -> None:
        if self.feature_cache_mb < 0:
            raise ConfigurationError("MASKCLIP_FEATURE_CACHE_MB must be 0 (off) or more megabytes.")
        if self.feature_store_gb < 0:
            raise ConfigurationError("MASKCLIP_FEATURE_STORE_GB must be 0 (off) or more gigabytes.")
        if not 0 < self.holdout_fraction < 1:
            raise ConfigurationError("MASKCLIP_HOLDOUT_FRACTION must be between 0 and 1.")
        if not -1 < self.gate_margin < 1:
            raise ConfigurationError("MASKCLIP_GATE_MARGIN is an mIoU gain, between -1 and 1.")
        if not 0.5 <= self.gate_confidence < 1:
            raise ConfigurationError("MASKCLIP_GATE_CONFIDENCE must be at least 0.5 and below 1 (e.g. 0.95).")
