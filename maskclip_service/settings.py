"""Backend configuration, read once from environment variables.

The same names work for ``maskclip-backend serve`` and under gunicorn.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from maskclip_engine import SegmentOptions  # torch-free: the gunicorn master reads settings without torch
from maskclip_engine.config import PRECISIONS

if TYPE_CHECKING:
    from maskclip_engine import Segmenter

from .errors import ConfigurationError
from .label_studio import allowed_origin


def _bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"{name}={raw!r} is not a boolean; use true or false.")


def _number(name: str, default: float, kind: type = float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not a {'whole ' if kind is int else ''}number.") from None


def _optional(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


@dataclass(frozen=True)
class Settings:
    """Everything the backend needs to know; see the README's configuration table."""

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
    queue_name: str = "maskclip-training"
    train_every: int = 0  # enqueue training after this many new/updated annotations (0: only on request)
    train_iterations: int = 400
    train_batch_size: int = 4
    train_crop: int = 320
    train_lr: float = 0.01
    student_backbone: str = "clip"
    student_backbone_weights: str | None = None  # ResNet students: a local ImageNet file, or "random"
    holdout_fraction: float = 0.2
    gate_min_pixels: int = 200_000  # held-out labelled pixels the gate needs before it may promote
    gate_margin: float = 0.005  # a candidate must beat the current model's held-out mIoU by more than this
    job_timeout: int = 6 * 3600
    predict_batch: int = 8  # /predict fetches, segments and encodes this many tasks at a time
    torch_threads: int = 0  # torch intra-op threads per process (0: torch's default)
    feature_cache_mb: float = 512.0  # dense state of recently seen images for interactive tools (0: off)
    preannotate_on_import: bool = True  # TASKS_CREATED webhooks queue pre-annotation of the new tasks
    preannotate_chunk: int = 32  # tasks per unit of pre-annotation work a worker takes
    preannotate_skip_annotated: bool = True  # whole-project runs leave tasks with submitted annotations alone
    preannotate_lease_s: int = 60  # a chunk whose worker is silent this long is taken over by another

    @classmethod
    def from_env(cls) -> Settings:
        defaults = SegmentOptions()
        try:
            segment = SegmentOptions(
                mode=os.environ.get("MASKCLIP_MODE", defaults.mode),  # type: ignore[arg-type]
                dense_mode=os.environ.get("MASKCLIP_DENSE_MODE", defaults.dense_mode),
                short_side=int(_number("MASKCLIP_SHORT_SIDE", defaults.short_side, int)),
                crop=int(_number("MASKCLIP_CROP", defaults.crop, int)),
                stride=int(_number("MASKCLIP_STRIDE", defaults.stride, int)),
                key_smoothing=_bool("MASKCLIP_KEY_SMOOTHING", defaults.key_smoothing),
                prompt_denoising=_bool("MASKCLIP_PROMPT_DENOISING", defaults.prompt_denoising),
                pd_threshold=_number("MASKCLIP_PD_THRESHOLD", defaults.pd_threshold),
                bg_threshold=_number("MASKCLIP_BG_THRESHOLD", defaults.bg_threshold),
                batch_size=int(_number("MASKCLIP_BATCH_SIZE", defaults.batch_size, int)),
                key_smoothing_variant=os.environ.get("MASKCLIP_KS_VARIANT", defaults.key_smoothing_variant),
                ks_threshold=_number("MASKCLIP_KS_THRESHOLD", defaults.ks_threshold),
                slide_refine=os.environ.get("MASKCLIP_SLIDE_REFINE", defaults.slide_refine),
                pamr=_bool("MASKCLIP_PAMR", defaults.pamr),
                pamr_iterations=int(_number("MASKCLIP_PAMR_ITERATIONS", defaults.pamr_iterations, int)),
                pamr_stride=int(_number("MASKCLIP_PAMR_STRIDE", defaults.pamr_stride, int)),
            )
        except ConfigurationError:
            raise
        except Exception as exc:  # an engine option error, reworded for the environment
            raise ConfigurationError(f"invalid MASKCLIP_* segmentation setting: {exc}") from exc
        root = _optional("LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT")
        cache = _optional("MASKCLIP_CACHE_DIR")
        hosts = tuple(h.strip().lower() for h in os.environ.get("MASKCLIP_ALLOWED_HOSTS", "").split(",") if h.strip())
        settings = cls(
            model=os.environ.get("MASKCLIP_MODEL", cls.model),
            pretrained=os.environ.get("MASKCLIP_PRETRAINED", cls.pretrained),
            device=_optional("MASKCLIP_DEVICE"),
            precision=os.environ.get("MASKCLIP_PRECISION", cls.precision),
            segment=segment,
            label_studio_url=_optional("LABEL_STUDIO_URL"),
            label_studio_api_key=_optional("LABEL_STUDIO_API_KEY"),
            local_files_root=Path(root) if root else None,
            allowed_hosts=hosts,
            model_dir=Path(os.environ.get("MODEL_DIR", "models")),
            cache_dir=Path(cache) if cache else None,
            redis_url=_optional("REDIS_URL"),
            basic_auth_user=_optional("BASIC_AUTH_USER"),
            basic_auth_pass=_optional("BASIC_AUTH_PASS"),
            max_image_bytes=int(_number("MASKCLIP_MAX_IMAGE_BYTES", cls.max_image_bytes, int)),
            max_image_pixels=int(_number("MASKCLIP_MAX_IMAGE_PIXELS", cls.max_image_pixels, int)),
            max_labels=int(_number("MASKCLIP_MAX_LABELS", cls.max_labels, int)),
            max_prompts=int(_number("MASKCLIP_MAX_PROMPTS", cls.max_prompts, int)),
            max_tasks=int(_number("MASKCLIP_MAX_TASKS", cls.max_tasks, int)),
            max_request_bytes=int(_number("MASKCLIP_MAX_REQUEST_BYTES", cls.max_request_bytes, int)),
            student_cache_size=int(_number("MASKCLIP_STUDENT_CACHE_SIZE", cls.student_cache_size, int)),
            text_cache_entries=int(_number("MASKCLIP_TEXT_CACHE_ENTRIES", cls.text_cache_entries, int)),
            max_warmups=int(_number("MASKCLIP_MAX_WARMUPS", cls.max_warmups, int)),
            warmup_queue=int(_number("MASKCLIP_WARMUP_QUEUE", cls.warmup_queue, int)),
            fetch_timeout=_number("MASKCLIP_FETCH_TIMEOUT", cls.fetch_timeout),
            fetch_retries=int(_number("MASKCLIP_FETCH_RETRIES", cls.fetch_retries, int)),
            queue_name=os.environ.get("MASKCLIP_QUEUE", cls.queue_name),
            train_every=int(_number("MASKCLIP_TRAIN_EVERY", cls.train_every, int)),
            train_iterations=int(_number("MASKCLIP_TRAIN_ITERATIONS", cls.train_iterations, int)),
            train_batch_size=int(_number("MASKCLIP_TRAIN_BATCH_SIZE", cls.train_batch_size, int)),
            train_crop=int(_number("MASKCLIP_TRAIN_CROP", cls.train_crop, int)),
            train_lr=_number("MASKCLIP_TRAIN_LR", cls.train_lr),
            student_backbone=os.environ.get("MASKCLIP_STUDENT_BACKBONE", cls.student_backbone),
            student_backbone_weights=_optional("MASKCLIP_STUDENT_BACKBONE_WEIGHTS"),
            holdout_fraction=_number("MASKCLIP_HOLDOUT_FRACTION", cls.holdout_fraction),
            gate_min_pixels=int(_number("MASKCLIP_GATE_MIN_PIXELS", cls.gate_min_pixels, int)),
            gate_margin=_number("MASKCLIP_GATE_MARGIN", cls.gate_margin),
            job_timeout=int(_number("MASKCLIP_JOB_TIMEOUT", cls.job_timeout, int)),
            predict_batch=int(_number("MASKCLIP_PREDICT_BATCH", cls.predict_batch, int)),
            torch_threads=int(_number("MASKCLIP_TORCH_THREADS", cls.torch_threads, int)),
            feature_cache_mb=_number("MASKCLIP_FEATURE_CACHE_MB", cls.feature_cache_mb),
            preannotate_on_import=_bool("MASKCLIP_PREANNOTATE_ON_IMPORT", cls.preannotate_on_import),
            preannotate_chunk=int(_number("MASKCLIP_PREANNOTATE_CHUNK", cls.preannotate_chunk, int)),
            preannotate_skip_annotated=_bool("MASKCLIP_PREANNOTATE_SKIP_ANNOTATED", cls.preannotate_skip_annotated),
            preannotate_lease_s=int(_number("MASKCLIP_PREANNOTATE_LEASE_S", cls.preannotate_lease_s, int)),
        )
        settings.validate()
        return settings

    def build_segmenter(self) -> Segmenter:
        """The MaskCLIP model these settings name. It loads weights: build it once per process."""
        from maskclip_engine import ModelSpec, Segmenter, load_clip
        from maskclip_engine.text import TextEmbedder

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
        return Segmenter(clip, self.segment, text)

    def validate(self) -> None:
        if self.label_studio_url and not self.label_studio_url.startswith(("http://", "https://")):
            raise ConfigurationError(f"LABEL_STUDIO_URL={self.label_studio_url!r} must start with http:// or https://.")
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise ConfigurationError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither.")
        if self.local_files_root is not None and not self.local_files_root.is_dir():
            raise ConfigurationError(
                f"LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={self.local_files_root} is not a folder on this machine."
            )
        for name in (
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
            "train_batch_size",
            "predict_batch",
            "preannotate_chunk",
            "preannotate_lease_s",
        ):
            if getattr(self, name) <= 0:
                raise ConfigurationError(f"{name} must be positive.")
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
        if self.feature_cache_mb < 0:
            raise ConfigurationError("MASKCLIP_FEATURE_CACHE_MB must be 0 (off) or more megabytes.")
        if not 0 < self.holdout_fraction < 1:
            raise ConfigurationError("MASKCLIP_HOLDOUT_FRACTION must be between 0 and 1.")
        if self.gate_min_pixels < 0 or not 0 <= self.gate_margin < 1:
            raise ConfigurationError(
                "MASKCLIP_GATE_MIN_PIXELS must be 0 or more and MASKCLIP_GATE_MARGIN between 0 and 1 (an mIoU gain)."
            )
