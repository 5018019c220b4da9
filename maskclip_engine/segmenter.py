"""The public entry point: zero-shot segmentation of images into a label set."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .config import ModelSpec, SegmentOptions
from .dense import dense_features
from .errors import InvalidOptionError
from .images import resized_shape, to_rgb_array, window_starts
from .interactive import DenseState
from .loading import LoadedClip, load_clip
from .pamr import refine_against_image
from .prompts import LabelInput, LabelSet
from .refinement import Refined, average_windows, refine, window_output
from .result import SegmentationResult, result_from_probabilities
from .text import TextEmbedder


@dataclass
class _Canvas:
    """Per-image accumulators on the feature grid of the resized image."""

    logits: torch.Tensor  # [C, gh, gw]
    keys: torch.Tensor  # [K, gh, gw]
    count: torch.Tensor  # [gh, gw]
    # slide_refine="window": each window's (top, left, height, width), refinement and output
    windows: list[tuple[tuple[int, int, int, int], Refined, torch.Tensor]] = field(default_factory=list)
    pixels: torch.Tensor | None = None  # the resized, normalised image [3, H, W], for PAMR


@dataclass(frozen=True)
class _Window:
    image: int
    top: int
    left: int
    height: int
    width: int


class Segmenter:
    """MaskCLIP on a frozen CLIP model: ``segment(image, labels) -> SegmentationResult``.

    Holds a built model and a text-embedding cache, nothing per image, so one
    instance serves many threads. Build it with :meth:`from_pretrained`.
    """

    def __init__(
        self,
        clip: LoadedClip,
        options: SegmentOptions | None = None,
        text: TextEmbedder | None = None,
    ) -> None:
        self.clip = clip
        self.options = options or SegmentOptions()
        self.text = text or TextEmbedder(clip, clip.spec.resolved_cache_dir)
        self._mean = torch.tensor(clip.mean, device=clip.device).view(3, 1, 1)
        self._std = torch.tensor(clip.std, device=clip.device).view(3, 1, 1)

    @classmethod
    def from_pretrained(
        cls,
        model: str = "ViT-B-16",
        pretrained: str | None = "openai",
        device: str | None = None,
        precision: str = "auto",
        *,
        quick_gelu: bool | None = None,
        cache_dir: str | Path | None = None,
        options: SegmentOptions | None = None,
    ) -> Segmenter:
        """Build the model once; ``pretrained`` is an open_clip tag or a local checkpoint path."""
        spec = ModelSpec(
            model=model,
            pretrained=pretrained,
            device=device,
            precision=precision,  # type: ignore[arg-type]
            quick_gelu=quick_gelu,
            cache_dir=Path(cache_dir) if cache_dir is not None else None,
        )
        return cls(load_clip(spec), options)

    @property
    def stride(self) -> int:
        """Pixels per feature-grid cell: the patch size of a ViT, 32 for a ResNet."""
        return self.clip.stride

    # ------------------------------------------------------------------ text
    def text_embeddings(self, labels: Sequence[LabelInput]) -> torch.Tensor:
        """``[C, D]`` L2-normalised 85-template embeddings, one row per label.

        A label with synonyms gets the renormalised mean of its synonyms' rows
        (``segment`` itself scores such a label by its best synonym).
        """
        labelset = LabelSet.parse(labels)
        per_prompt = self.text.embed(labelset.prompts)
        owner = torch.tensor(labelset.owner)
        summed = torch.zeros(len(labelset), per_prompt.shape[1]).index_add_(0, owner, per_prompt)
        return F.normalize(summed, dim=-1)

    # ----------------------------------------------------------------- image
    @torch.inference_mode()
    def dense_features_and_keys(
        self, pixels: torch.Tensor, dense_mode: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``[B, D, h, w]`` (joint space, not normalised) and keys ``[B, K, h, w]``, float32.

        ``dense_mode`` defaults to the segmenter's option (``maskclip``).
        """
        if self.clip.device.type == "cpu" and pixels.shape[0] > 1:
            # On a CPU a batch buys no throughput, and under bf16 autocast a batch of four 448x448 windows ran
            # about 8x slower per image than one at a time (measured, torch 2.14, AVX512-BF16): one at a time.
            parts = [self.dense_features_and_keys(one[None], dense_mode) for one in pixels]
            return torch.cat([f for f, _ in parts]), torch.cat([k for _, k in parts])
        pixels = pixels.to(self.clip.device, self.clip.dtype)
        with self.clip.autocast():  # the backbone only: logits, softmax and refinement stay float32
            features, keys = dense_features(self.clip.visual, pixels, dense_mode or self.options.dense_mode)
        return features.float(), keys.float()

    def dense_features_torch(self, pixels: torch.Tensor, dense_mode: str | None = None) -> torch.Tensor:
        """MaskCLIP embeddings ``[B, D, H/stride, W/stride]`` of a normalised batch ``[B, 3, H, W]``."""
        return self.dense_features_and_keys(pixels, dense_mode)[0]

    def normalize(self, rgb: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
        """``HxWx3 uint8`` to a resized (``size`` = (h, w)), model-normalised ``[3, h, w]`` tensor."""
        if not rgb.flags.writeable:
            rgb = rgb.copy()
        x = torch.from_numpy(rgb).to(self.clip.device).permute(2, 0, 1).float().div_(255)
        if tuple(x.shape[1:]) != size:
            x = F.interpolate(x[None], size=size, mode="bicubic", align_corners=False, antialias=True)[0]
            x = x.clamp_(0, 1)
        return (x - self._mean) / self._std

    # --------------------------------------------------------------- segment
    def segment(self, image: Any, labels: Sequence[LabelInput], **options: Any) -> SegmentationResult:
        """Segment one image (PIL or ``HxWx3 uint8``) into ``labels``; options override :attr:`options`."""
        return self.segment_batch([image], labels, **options)[0]

    @torch.inference_mode()
    def segment_batch(
        self, images: Sequence[Any], labels: Sequence[LabelInput], **options: Any
    ) -> list[SegmentationResult]:
        """Segment several images with one label set, batching windows of equal size through the model."""
        opts = self.options.replace(**options)
        self._check_windows(opts)
        labelset = LabelSet.parse(labels)
        arrays = [to_rgb_array(image) for image in images]
        if not arrays:
            return []
        text = self.text.embed(labelset.prompts).to(self.clip.device)
        owner = torch.tensor(labelset.owner, device=self.clip.device)
        canvases = self._encode(arrays, text, owner, len(labelset), opts)
        return [self._finish(rgb.shape[:2], canvas, labelset, opts) for rgb, canvas in zip(arrays, canvases)]

    def dense_state(self, image: Any, labels: Sequence[LabelInput], **options: Any) -> DenseState:
        """One image's features, keys and label probabilities on its feature grid, with the image's size
        and the grid's stride (the resized image is ``grid * stride``); see :meth:`segment_with_state`."""
        return self.segment_with_state(image, labels, **options)[1]

    @torch.inference_mode()
    def segment_with_state(
        self, image: Any, labels: Sequence[LabelInput], **options: Any
    ) -> tuple[SegmentationResult, DenseState]:
        """``segment`` plus the image's dense state (features, keys, label probabilities on the grid).

        One forward pass serves both: the result is what ``segment`` returns,
        and the state answers later clicks, boxes and phrases on this image
        (see :mod:`maskclip_engine.interactive`).
        """
        opts = self.options.replace(**options)
        self._check_windows(opts)
        labelset = LabelSet.parse(labels)
        rgb = to_rgb_array(image)
        text = self.text.embed(labelset.prompts).to(self.clip.device)
        owner = torch.tensor(labelset.owner, device=self.clip.device)
        record: list = []
        canvas = self._encode([rgb], text, owner, len(labelset), opts, record=record)[0]
        result = self._finish(rgb.shape[:2], canvas, labelset, opts)
        # The state averages windows on the grid whatever the slide refinement: one map per image.
        s = self.stride
        count = torch.zeros(canvas.count.shape, device=canvas.count.device)
        sums: dict[str, torch.Tensor] = {}
        for windows, *maps in record:
            for i, w in enumerate(windows):
                cells = (slice(w.top // s, (w.top + w.height) // s), slice(w.left // s, (w.left + w.width) // s))
                for name, value in zip(("features", "keys", "logits"), maps):
                    if name not in sums:
                        sums[name] = value.new_zeros((value.shape[1], *count.shape))
                    sums[name][(slice(None), *cells)] += value[i]
                count[cells] += 1
        mean = {name: value / count.clamp_min(1) for name, value in sums.items()}
        refined = self._refine(mean["logits"], mean["keys"], opts)
        state = DenseState(
            features=mean["features"].float().cpu(),
            keys=mean["keys"].float().cpu(),
            probs=refined.probs.float().cpu(),
            labels=tuple(labelset.names),
            image_size=(int(rgb.shape[0]), int(rgb.shape[1])),
            stride=s,
        )
        return result, state

    def _check_windows(self, opts: SegmentOptions) -> None:
        if opts.dense_mode != "maskclip" and self.clip.arch != "vit":
            raise InvalidOptionError(
                f"dense_mode {opts.dense_mode!r} changes a ViT's last attention block; ResNet models support "
                "'maskclip' only."
            )
        if opts.mode == "slide":
            for name in ("crop", "stride"):
                if getattr(opts, name) % self.stride:
                    raise InvalidOptionError(
                        f"{name} {getattr(opts, name)} must be a multiple of the model's patch size {self.stride}."
                    )

    def _encode(
        self,
        arrays: list[np.ndarray],
        text: torch.Tensor,
        owner: torch.Tensor,
        num_labels: int,
        opts: SegmentOptions,
        record: list | None = None,
    ) -> list[_Canvas]:
        """Run every window of every image through the model and accumulate label logits on each grid.

        ``record`` (for :meth:`segment_with_state`) receives each batch's windows, features, keys and logits.
        """
        s = self.stride
        per_window = opts.mode == "slide" and opts.slide_refine == "window"
        resized, canvases, groups = [], [], defaultdict(list)
        for index, rgb in enumerate(arrays):
            height, width = resized_shape(*rgb.shape[:2], opts.short_side, opts.max_long_side, s)
            resized.append(self.normalize(rgb, (height, width)))
            canvases.append(None)
            if opts.mode == "whole":
                windows = [_Window(index, 0, 0, height, width)]
            else:
                wh, ww = min(opts.crop, height), min(opts.crop, width)
                windows = [
                    _Window(index, top, left, wh, ww)
                    for top in window_starts(height, wh, opts.stride)
                    for left in window_starts(width, ww, opts.stride)
                ]
            for window in windows:
                groups[(window.height, window.width)].append(window)

        for windows in groups.values():
            for start in range(0, len(windows), opts.batch_size):
                chunk = windows[start : start + opts.batch_size]
                pixels = torch.stack(
                    [resized[w.image][:, w.top : w.top + w.height, w.left : w.left + w.width] for w in chunk]
                )
                features, keys = self.dense_features_and_keys(pixels, opts.dense_mode)
                logits = self._label_logits(features, text, owner, num_labels)
                if record is not None:
                    record.append((chunk, features, keys, logits))
                for w, window_logits, window_keys in zip(chunk, logits, keys):
                    if canvases[w.image] is None:
                        grid = (resized[w.image].shape[1] // s, resized[w.image].shape[2] // s)
                        canvases[w.image] = _Canvas(
                            logits=logits.new_zeros((num_labels, *grid)),
                            keys=keys.new_zeros((keys.shape[1], *grid)),
                            count=logits.new_zeros(grid),
                            pixels=resized[w.image] if opts.pamr else None,
                        )
                    canvas = canvases[w.image]
                    if per_window:  # mmseg's slide inference: the whole head, PD and KS included, per window
                        refined = self._refine(window_logits, window_keys, opts)
                        output = window_output(window_logits, refined, opts.key_smoothing)
                        canvas.windows.append(((w.top, w.left, w.height, w.width), refined, output))
                        continue
                    rows = slice(w.top // s, (w.top + w.height) // s)
                    cols = slice(w.left // s, (w.left + w.width) // s)
                    canvas.logits[:, rows, cols] += window_logits
                    canvas.keys[:, rows, cols] += window_keys
                    canvas.count[rows, cols] += 1
        return canvases  # type: ignore[return-value]

    @staticmethod
    def _label_logits(features: torch.Tensor, text: torch.Tensor, owner: torch.Tensor, num_labels: int) -> torch.Tensor:
        """Cosine logits ``[B, C, h, w]``; a label's logit is the best of its synonyms'."""
        per_prompt = torch.einsum("bdhw,sd->bshw", F.normalize(features, dim=1), text)
        if per_prompt.shape[1] == num_labels:
            return per_prompt
        index = owner.view(1, -1, 1, 1).expand_as(per_prompt)
        out = per_prompt.new_full((per_prompt.shape[0], num_labels, *per_prompt.shape[2:]), float("-inf"))
        return out.scatter_reduce_(1, index, per_prompt, reduce="amax")

    def _finish(
        self, shape: tuple[int, int], canvas: _Canvas, labelset: LabelSet, opts: SegmentOptions
    ) -> SegmentationResult:
        if canvas.windows:
            size = (canvas.count.shape[0] * self.stride, canvas.count.shape[1] * self.stride)
            refined = average_windows(canvas.windows, size, None if opts.key_smoothing else opts.logit_scale)
        else:
            count = canvas.count.clamp_min(1)
            refined = self._refine(canvas.logits / count, canvas.keys / count, opts)
        if opts.pamr and canvas.pixels is not None:
            refined = refine_against_image(refined, canvas.pixels, opts.pamr_iterations, opts.pamr_stride)
        return result_from_probabilities(
            refined.probs, shape, labelset.names, refined.kept, opts.bg_threshold, scores=refined.scores
        )

    @staticmethod
    def _refine(logits: torch.Tensor, keys: torch.Tensor, opts: SegmentOptions) -> Refined:
        return refine(
            logits,
            keys,
            logit_scale=opts.logit_scale,
            prompt_denoise=opts.prompt_denoising,
            pd_threshold=opts.pd_threshold,
            key_smooth=opts.key_smoothing,
            variant=opts.key_smoothing_variant,
            ks_threshold=opts.ks_threshold,
        )
