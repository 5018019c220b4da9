"""Builds frozen open_clip models: the one place that knows about weights.

A model is built once (name, weights, device and precision from one
:class:`ModelSpec`) and handed to the inference objects, which never load
anything themselves.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import pickle
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import open_clip
import torch
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer

from maskclip_engine.backbone.precision import (
    AUTOCAST_DTYPES,
    backbone_autocast,
    matrix_weight_dtype,
    resolve_precision,
    store_matrix_weights,
)
from maskclip_engine.config import ModelSpec
from maskclip_engine.errors import (
    InvalidOptionError,
    ModelNotFoundError,
    UnsupportedModelError,
    WeightsUnavailableError,
)

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
_SCHEMAS = ("hf-hub:", "local-dir:")


@dataclass(frozen=True)
class LoadedClip:
    """A built, frozen CLIP model and the facts inference needs about it.

    ``model_id`` and ``weights_id`` identify the architecture and the exact
    weights; caches and model versions are keyed by them. ``dtype`` is what
    pixels enter the image tower in (float32); ``precision`` is the concrete
    precision the image backbone runs in, under :meth:`autocast`, and its
    matrix weights are stored in it (:func:`store_matrix_weights`), so a model
    is loaded once per precision.
    """

    model: torch.nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    spec: ModelSpec
    model_id: str
    weights_id: str
    device: torch.device
    dtype: torch.dtype
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    arch: Literal["vit", "resnet"]
    stride: int
    embed_dim: int
    precision: str = "fp32"

    def __post_init__(self) -> None:
        stored = matrix_weight_dtype(self.model.visual)
        if stored != AUTOCAST_DTYPES.get(self.precision, torch.float32):
            raise InvalidOptionError(
                f"this model's image tower holds {stored} weights but precision {self.precision!r} was asked for; "
                f"load the model again with that precision (load_clip / Segmenter.from_pretrained)."
            )

    @property
    def visual(self) -> torch.nn.Module:
        return self.model.visual

    @property
    def autocast_dtype(self) -> torch.dtype:
        """The dtype the backbone computes in: bf16, fp16, or float32."""
        return AUTOCAST_DTYPES.get(self.precision, torch.float32)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Where the image backbone runs: autocast in bf16/fp16, a no-op in fp32. Heads stay outside it."""
        return backbone_autocast(self.device, self.precision)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` gives CUDA when present, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise WeightsUnavailableError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'.") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise WeightsUnavailableError(f"device {device!r} was asked for but CUDA is not available here; use 'cpu'.")
    return resolved


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes: the identity of local weights."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def is_torchscript_archive(path: Path) -> bool:
    """OpenAI's released ``.pt`` files are TorchScript archives, not state dicts."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def resolve_model_name(model: str) -> tuple[str, str]:
    """Return the open_clip name to build and a stable id of the architecture."""
    if model.startswith(_SCHEMAS):
        return model, model
    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise ModelNotFoundError(f"model config file {model} does not exist.")
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(f"model config file {model} is not valid JSON: {exc}") from exc
        if not isinstance(config, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(config):
            raise ModelNotFoundError(
                f"model config file {model} needs 'embed_dim', 'vision_cfg' and 'text_cfg' like open_clip's configs."
            )
        open_clip.add_model_config(path)
        canonical = json.dumps(config, sort_keys=True).encode()
        return path.stem, f"{path.stem}@{hashlib.sha256(canonical).hexdigest()[:12]}"
    if model not in open_clip.list_models():
        close = difflib.get_close_matches(model, open_clip.list_models(), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ModelNotFoundError(
            f"unknown model {model!r}: not an open_clip architecture.{hint} "
            "`python -c 'import open_clip; print(open_clip.list_models())'` lists them."
        )
    return model, model


def torchscript_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The weights inside an OpenAI TorchScript archive, without its bookkeeping buffers.

    ``torch.load(weights_only=True)`` refuses TorchScript archives, so they are
    opened with ``torch.jit.load``, which runs no pickled Python code.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the deprecation concerns new code, not old archives
            archive = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as exc:
        raise WeightsUnavailableError(f"{path} looks like a TorchScript archive but could not be read: {exc}") from exc
    state = dict(archive.state_dict())
    for key in ("input_resolution", "context_length", "vocab_size", "attn_mask"):
        state.pop(key, None)
    return state


class _DropRandomInitWarning(logging.Filter):
    """open_clip warns of random weights when the checkpoint is loaded by us afterwards."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def _create(name: str, checkpoint: str | None, spec: ModelSpec, device: torch.device, quick_gelu: bool):
    torchscript = checkpoint is not None and Path(checkpoint).is_file() and is_torchscript_archive(Path(checkpoint))
    if not torchscript:
        return open_clip.create_model(
            name,
            pretrained=checkpoint,
            precision="fp32",  # built in float32; load_clip stores the image tower's matrices in its precision
            device=device,
            force_quick_gelu=quick_gelu,
            cache_dir=str(spec.resolved_cache_dir / "weights"),
            weights_only=True,
        )
    state = torchscript_state_dict(Path(checkpoint))
    quiet = _DropRandomInitWarning()
    logging.getLogger().addFilter(quiet)
    try:
        model = open_clip.create_model(
            name, pretrained=None, precision="fp32", device=device, force_quick_gelu=quick_gelu
        )
    finally:
        logging.getLogger().removeFilter(quiet)
    model.load_state_dict(state, strict=True)
    return model


def _looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.endswith(CHECKPOINT_SUFFIXES)


def _resolve_weights(name: str, pretrained: str | None, quick_gelu: bool | None) -> tuple[str | None, str, bool]:
    """Return (what to pass open_clip, weights id, quick_gelu)."""
    if pretrained is None or pretrained == "random":
        log.warning("model %s is randomly initialised: its masks are meaningless (fine for timing only).", name)
        return None, "random", bool(quick_gelu)
    path = Path(pretrained).expanduser()
    if path.is_file():
        torchscript = is_torchscript_archive(path)
        # OpenAI's own checkpoints were all trained with QuickGELU.
        gelu = quick_gelu if quick_gelu is not None else torchscript
        return str(path), f"sha256:{file_digest(path)[:16]}", gelu
    if _looks_like_path(pretrained):
        raise WeightsUnavailableError(f"checkpoint file {pretrained} does not exist.")
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        known = ", ".join(tags) if tags else "none"
        raise WeightsUnavailableError(
            f"{pretrained!r} is neither a checkpoint file nor a pretrained tag of {name} (known tags: {known})."
        )
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    gelu = quick_gelu if quick_gelu is not None else bool(tag_cfg.get("quick_gelu", False))
    return pretrained, f"tag:{pretrained}", gelu


def _architecture(visual: torch.nn.Module, model_name: str) -> tuple[Literal["vit", "resnet"], int]:
    if isinstance(visual, VisionTransformer):
        if visual.attn_pool is not None:
            raise UnsupportedModelError(
                f"{model_name} pools image tokens with attention (CoCa-style); MaskCLIP needs a ViT with a "
                "class token or an OpenAI ModifiedResNet."
            )
        if not isinstance(visual.transformer.resblocks[-1].attn, torch.nn.MultiheadAttention):
            raise UnsupportedModelError(f"{model_name} uses a custom attention block that MaskCLIP cannot open up.")
        patch_h, patch_w = visual.patch_size
        if patch_h != patch_w:
            raise UnsupportedModelError(f"{model_name} has non-square patches, which are not supported.")
        return "vit", int(patch_h)
    if isinstance(visual, ModifiedResNet):
        return "resnet", 32
    raise UnsupportedModelError(
        f"{model_name} has a {type(visual).__name__} image tower; MaskCLIP dense features exist for open_clip "
        "VisionTransformer and ModifiedResNet (RN50, RN101, ...) models only."
    )


def load_clip(spec: ModelSpec) -> LoadedClip:
    """Build the model of ``spec``, load its weights and freeze it.

    Raises :class:`ModelNotFoundError`, :class:`WeightsUnavailableError` or
    :class:`UnsupportedModelError` with a message that says what to do.
    """
    name, model_id = resolve_model_name(spec.model)
    checkpoint, weights_id, quick_gelu = _resolve_weights(name, spec.pretrained, spec.quick_gelu)
    device = resolve_device(spec.device)
    precision = resolve_precision(spec.precision, device)
    try:
        model = _create(name, checkpoint, spec, device, quick_gelu)
    except pickle.UnpicklingError as exc:
        raise WeightsUnavailableError(
            f"checkpoint {checkpoint} holds Python objects besides tensors and is not loaded for safety; "
            "re-save it as a plain state dict (torch.save(model.state_dict(), path))."
        ) from exc
    except RuntimeError as exc:
        message = str(exc)
        if "download" in message.lower():
            raise WeightsUnavailableError(
                f"could not download the {spec.pretrained!r} weights of {name} (no network or no access to the "
                f"model hub?). Download them on a machine that has access, then pass the local checkpoint file "
                f"instead: pretrained='/path/to/checkpoint.pt' (CLI: --pretrained PATH). Cause: {message}"
            ) from exc
        raise WeightsUnavailableError(f"checkpoint {checkpoint} does not fit model {name}: {message}") from exc
    model.eval().requires_grad_(False)
    visual = model.visual
    arch, stride = _architecture(visual, name)
    cfg = getattr(visual, "preprocess_cfg", {}) or {}
    mean = tuple(float(v) for v in cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(float(v) for v in cfg.get("std", open_clip.OPENAI_DATASET_STD))
    dtype = visual.conv1.weight.dtype
    if precision in AUTOCAST_DTYPES:
        store_matrix_weights(visual, AUTOCAST_DTYPES[precision])
    log.info("loaded %s (%s) on %s, image backbone in %s", name, weights_id, device, precision)
    return LoadedClip(
        model=model,
        tokenizer=open_clip.get_tokenizer(name),
        spec=spec,
        model_id=model_id + ("+quickgelu" if quick_gelu else ""),
        weights_id=weights_id,
        device=device,
        dtype=dtype,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        arch=arch,
        stride=stride,
        embed_dim=int(visual.output_dim),
        precision=precision,
    )
