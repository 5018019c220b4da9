"""The public entry point: zero-shot segmentation of images into a label set.

A segmentation is two steps: the backbone turns an image into label-independent
:class:`~maskclip_engine.features.image_features.ImageFeatures` (the expensive part,
looked up first in the segmenter's :class:`~maskclip_engine.features.source.FeatureSource`),
then the head scores them against the labels' text embeddings and refines the
result (cheap). :meth:`Segmenter.encode` and :meth:`Segmenter.segment_features`
run the steps one at a time; :meth:`Segmenter.segment` runs both.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from maskclip_engine.backbone.device_batches import device_batches
from maskclip_engine.backbone.loading import LoadedClip, load_clip
from maskclip_engine.backbone.text import TextEmbedder
from maskclip_engine.config import ModelSpec, SegmentOptions
from maskclip_engine.dense.calibrated import CALIBRATED_MODES, layer_plan
from maskclip_engine.dense.modes import dense_features
from maskclip_engine.errors import InvalidOptionError
from maskclip_engine.features.dense_state import DenseState
from maskclip_engine.features.image_features import FeatureKey, ImageFeatures, Window, image_digest
from maskclip_engine.features.source import FeatureSource
from maskclip_engine.head.pamr import refine_against_image
from maskclip_engine.head.refinement import Refined, average_windows, refine_with_options, window_output
from maskclip_engine.images import resized_shape, to_rgb_array, window_starts
from maskclip_engine.labels import LabelInput, LabelSet
from maskclip_engine.result import SegmentationResult, result_from_probabilities


def label_logits(features: torch.Tensor, text: torch.Tensor, owner: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Cosine logits ``[B, C, h, w]`` of features ``[B, D, h, w]`` against per-synonym text rows ``[S, D]``.

    ``owner[s]`` is the label of text row ``s``; a label's logit is the best of
    its synonyms'. MaskCLIP, its pseudo-label teacher and the students' text
    classifier all score labels with this one function.
    """
    per_prompt = torch.einsum("bdhw,sd->bshw", F.normalize(features, dim=1), text)
    if per_prompt.shape[1] == num_labels:
        return per_prompt
    index = owner.view(1, -1, 1, 1).expand_as(per_prompt)
    out = per_prompt.new_full((per_prompt.shape[0], num_labels, *per_prompt.shape[2:]), float("-inf"))
    return out.scatter_reduce_(1, index, per_prompt, reduce="amax")


class Segmenter:
    """MaskCLIP on a frozen CLIP model: ``segment(image, labels) -> SegmentationResult``.

    Holds a built model, a text-embedding cache and an optional feature source
    (memory and disk caches of backbone outputs, keyed by image content, model
    and options), nothing per call, so one instance serves many threads.
    Build it with :meth:`from_pretrained`.
    """

    def __init__(
        self,
        clip: LoadedClip,
        options: SegmentOptions | None = None,
        text: TextEmbedder | None = None,
        features: FeatureSource | None = None,
    ) -> None:
        self.clip = clip
        self.options = options or SegmentOptions()
        self.text = text or TextEmbedder(clip, clip.spec.resolved_cache_dir)
        self.features = features or FeatureSource()
        self.batches = device_batches(clip.model, clip.device)
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
        features: FeatureSource | None = None,
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
        return cls(load_clip(spec), options, features=features)

    def with_options(self, options: SegmentOptions) -> Segmenter:
        """A segmenter with other default options sharing this one's model, text cache and feature source."""
        return Segmenter(self.clip, options, self.text, self.features)

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

    def label_texts(self, labelset: LabelSet) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-synonym text embeddings ``[S, D]`` and their labels ``[S]`` on the model's device."""
        text = self.text.embed(labelset.prompts).to(self.clip.device)
        return text, torch.tensor(labelset.owner, device=self.clip.device)

    # ----------------------------------------------------------------- pixels
    def normalize(self, rgb: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
        """``HxWx3 uint8`` to a resized (``size`` = (h, w)), model-normalised ``[3, h, w]`` tensor."""
        if not rgb.flags.writeable:
            rgb = rgb.copy()
        x = torch.from_numpy(rgb).to(self.clip.device).permute(2, 0, 1).float().div_(255)
        if tuple(x.shape[1:]) != size:
            x = F.interpolate(x[None], size=size, mode="bicubic", align_corners=False, antialias=True)[0]
            x = x.clamp_(0, 1)
        return (x - self._mean) / self._std

    def from_unit(self, pixels: torch.Tensor) -> torch.Tensor:
        """RGB pixels in ``0..1`` (``[..., 3, H, W]``) normalised as the model expects."""
        return (pixels - self._mean) / self._std

    def to_unit(self, normalized: torch.Tensor) -> torch.Tensor:
        """Model-normalised pixels back to RGB in ``0..1``."""
        return normalized * self._std + self._mean

    # --------------------------------------------------------------- backbone
    @torch.inference_mode()
    def dense_features_and_keys(
        self, pixels: torch.Tensor, dense_mode: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``[B, D, h, w]`` (joint space, not normalised) and keys ``[B, K, h, w]``, float32.

        ``pixels`` are a model-normalised batch; ``dense_mode`` defaults to the
        segmenter's option.
        """
        mode = dense_mode or self.options.dense_mode

        def forward(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            batch = batch.to(self.clip.device, self.clip.dtype)
            with self.clip.autocast():  # the backbone only: logits, softmax and refinement stay float32
                features, keys = dense_features(self.clip.visual, batch, mode)
            return features.float(), keys.float()

        # One window at a time on a CPU; on CUDA as many as fit (maskclip_engine.backbone.device_batches).
        return self.batches.run(pixels, forward)

    def dense_features_torch(self, pixels: torch.Tensor, dense_mode: str | None = None) -> torch.Tensor:
        """MaskCLIP embeddings ``[B, D, H/stride, W/stride]`` of a normalised batch ``[B, 3, H, W]``."""
        return self.dense_features_and_keys(pixels, dense_mode)[0]

    def feature_key(self, rgb: np.ndarray, options: SegmentOptions) -> FeatureKey:
        """What identifies ``rgb``'s features under ``options`` in the feature source."""
        return FeatureKey.of(image_digest(rgb), self.clip, options)

    def encode(self, image: Any, **options: Any) -> ImageFeatures:
        """One image's backbone output (from the feature source when it holds it)."""
        return self.encode_batch([image], **options)[0]

    @torch.inference_mode()
    def encode_batch(self, images: Sequence[Any], **options: Any) -> list[ImageFeatures]:
        """Backbone outputs of several images; windows of equal size are batched through the model."""
        opts = self.options.replace(**options)
        self.check_options(opts)
        arrays = [to_rgb_array(image) for image in images]
        keys = [self.feature_key(rgb, opts) for rgb in arrays] if self.features.enabled else [None] * len(arrays)
        found: list[ImageFeatures | None] = [
            self.features.get(key, self.clip.device) if key is not None else None for key in keys
        ]
        missing = [i for i, value in enumerate(found) if value is None]
        for index, value in zip(missing, self._compute([arrays[i] for i in missing], opts)):
            key = keys[index]
            found[index] = self.features.put(key, value) if key is not None else value
        return found  # type: ignore[return-value]

    def _windows(self, height: int, width: int, opts: SegmentOptions) -> list[Window]:
        if opts.mode == "whole":
            return [Window(0, 0, height, width)]
        wh, ww = min(opts.crop, height), min(opts.crop, width)
        return [
            Window(top, left, wh, ww)
            for top in window_starts(height, wh, opts.stride)
            for left in window_starts(width, ww, opts.stride)
        ]

    def _compute(self, arrays: list[np.ndarray], opts: SegmentOptions) -> list[ImageFeatures]:
        """Run every window of every image through the backbone."""
        resized, plans = [], []
        groups: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
        for index, rgb in enumerate(arrays):
            height, width = resized_shape(*rgb.shape[:2], opts.short_side, opts.max_long_side, self.stride)
            resized.append(self.normalize(rgb, (height, width)))
            windows = self._windows(height, width, opts)
            plans.append(windows)
            for number, window in enumerate(windows):
                groups[(window.height, window.width)].append((index, number))
        outputs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for members in groups.values():
            for start in range(0, len(members), opts.batch_size):
                chunk = members[start : start + opts.batch_size]
                pixels = torch.stack([_crop(resized[i], plans[i][n]) for i, n in chunk])
                features, keys = self.dense_features_and_keys(pixels, opts.dense_mode)
                for position, member in enumerate(chunk):
                    outputs[member] = (features[position], keys[position])
        out = []
        for index, (rgb, windows) in enumerate(zip(arrays, plans)):
            maps = [outputs[(index, n)] for n in range(len(windows))]
            out.append(
                ImageFeatures(
                    features=torch.stack([f for f, _ in maps]),
                    keys=torch.stack([k for _, k in maps]),
                    windows=tuple(windows),
                    resized=tuple(resized[index].shape[1:]),  # type: ignore[arg-type]
                    image_size=(int(rgb.shape[0]), int(rgb.shape[1])),
                    stride=self.stride,
                )
            )
        return out

    def check_options(self, opts: SegmentOptions) -> None:
        """Refuse options this model cannot run (a ViT-only dense mode on a ResNet, windows off the patch grid)."""
        if opts.dense_mode != "maskclip" and self.clip.arch != "vit":
            raise InvalidOptionError(
                f"dense_mode {opts.dense_mode!r} changes a ViT's last attention block; ResNet models support "
                "'maskclip' only."
            )
        if opts.dense_mode in CALIBRATED_MODES:
            layer_plan(len(self.clip.visual.transformer.resblocks))  # refuses towers too shallow for the mode
        if opts.mode == "slide":
            for name in ("crop", "stride"):
                if getattr(opts, name) % self.stride:
                    raise InvalidOptionError(
                        f"{name} {getattr(opts, name)} must be a multiple of the model's patch size {self.stride}."
                    )

    # ------------------------------------------------------------------ head
    def segment(self, image: Any, labels: Sequence[LabelInput], **options: Any) -> SegmentationResult:
        """Segment one image (PIL or ``HxWx3 uint8``) into ``labels``; options override :attr:`options`."""
        return self.segment_batch([image], labels, **options)[0]

    @torch.inference_mode()
    def segment_batch(
        self, images: Sequence[Any], labels: Sequence[LabelInput], **options: Any
    ) -> list[SegmentationResult]:
        """Segment several images with one label set."""
        arrays = [to_rgb_array(image) for image in images]
        if not arrays:
            return []
        encoded = self.encode_batch(arrays, **options)
        return [self.segment_features(f, labels, rgb, **options) for f, rgb in zip(encoded, arrays)]

    @torch.inference_mode()
    def segment_features(
        self,
        features: ImageFeatures,
        labels: Sequence[LabelInput],
        image: Any = None,
        size: tuple[int, int] | None = None,
        **options: Any,
    ) -> SegmentationResult:
        """The head alone: ``features`` of one image scored against ``labels`` and refined.

        ``image`` (the same image, at any size) is needed only with PAMR, which
        refines against its colours. The result has the image's original size,
        or ``size`` ``(height, width)``.
        """
        opts = self.options.replace(**options)
        return self._head(features, LabelSet.parse(labels), image, opts, False, size)[0]

    def _head(
        self,
        features: ImageFeatures,
        labelset: LabelSet,
        image: Any,
        opts: SegmentOptions,
        with_grid: bool,
        size: tuple[int, int] | None = None,
    ) -> tuple[SegmentationResult, Refined | None, torch.Tensor | None]:
        """The result and, ``with_grid``, the refinement of the whole grid (what smart tools read) and its keys."""
        text, owner = self.label_texts(labelset)
        per_window = opts.mode == "slide" and opts.slide_refine == "window"
        on_grid = keys = None
        if with_grid or not per_window:
            logits, keys = grid_logits(features, text, owner, len(labelset))
            on_grid = refine_with_options(logits, keys, opts)
        if per_window:  # mmseg's slide inference: the head per window
            refined = self._per_window(features, text, owner, len(labelset), opts)
        else:
            refined = on_grid
        if opts.pamr:
            if image is None:
                raise InvalidOptionError("PAMR refines against the image's colours: pass the image with its features.")
            pixels = self.normalize(to_rgb_array(image), features.resized)
            refined = refine_against_image(refined, pixels, opts.pamr_iterations, opts.pamr_stride)
        shape = size or features.image_size
        result = result_from_probabilities(
            refined.probs, shape, labelset.names, refined.kept, opts.bg_threshold, scores=refined.scores
        )
        return result, on_grid, keys

    def _per_window(
        self, features: ImageFeatures, text: torch.Tensor, owner: torch.Tensor, count: int, opts: SegmentOptions
    ) -> Refined:
        logits = label_logits(features.features, text, owner, count)
        windows = []
        for window, window_logits, window_keys in zip(features.windows, logits, features.keys):
            refined = refine_with_options(window_logits, window_keys, opts)
            output = window_output(window_logits, refined, opts.key_smoothing)
            windows.append(((window.top, window.left, window.height, window.width), refined, output))
        return average_windows(windows, features.resized, None if opts.key_smoothing else opts.logit_scale)

    # ------------------------------------------------------- smart-tool state
    def dense_state(self, image: Any, labels: Sequence[LabelInput], **options: Any) -> DenseState:
        """One image's features, keys and label probabilities on its feature grid; see :meth:`segment_with_state`."""
        return self.segment_with_state(image, labels, **options)[1]

    @torch.inference_mode()
    def segment_with_state(
        self, image: Any, labels: Sequence[LabelInput], **options: Any
    ) -> tuple[SegmentationResult, DenseState]:
        """``segment`` plus the image's dense state, from one backbone pass (or none, from the feature source).

        The state answers later clicks, boxes and phrases on this image (see
        :mod:`maskclip_engine.regions`): windows averaged on the grid
        whatever the slide refinement, label probabilities refined once over
        the whole grid.
        """
        rgb = to_rgb_array(image)
        features = self.encode(rgb, **options)
        labelset = LabelSet.parse(labels)
        result, on_grid, keys = self._head(features, labelset, rgb, self.options.replace(**options), True)
        assert on_grid is not None and keys is not None
        return result, _dense_state(features, labelset, on_grid, keys)

    @torch.inference_mode()
    def state_from_features(self, features: ImageFeatures, labels: Sequence[LabelInput], **options: Any) -> DenseState:
        """The dense state of :meth:`segment_with_state` from features alone (no image, no result)."""
        opts = self.options.replace(**options)
        labelset = LabelSet.parse(labels)
        text, owner = self.label_texts(labelset)
        logits, keys = grid_logits(features, text, owner, len(labelset))
        return _dense_state(features, labelset, refine_with_options(logits, keys, opts), keys)


def _dense_state(features: ImageFeatures, labelset: LabelSet, on_grid: Refined, keys: torch.Tensor) -> DenseState:
    mean_features, _ = features.whole_grid()
    return DenseState(
        features=mean_features.float().cpu(),
        keys=keys.float().cpu(),
        probs=on_grid.probs.float().cpu(),
        labels=tuple(labelset.names),
        image_size=features.image_size,
        stride=features.stride,
    )


def grid_logits(
    features: ImageFeatures, text: torch.Tensor, owner: torch.Tensor, count: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Label logits ``[C, rows, cols]`` and keys ``[K, rows, cols]`` over the whole grid, windows averaged.

    Each window is scored on its own (a label's logit is its best synonym's in
    that window) before the averaging, as slide inference does.
    """
    logits = label_logits(features.features, text, owner, count)
    if len(features.windows) == 1 and logits.shape[-2:] == features.grid:
        return logits[0], features.keys[0]
    summed = logits.new_zeros((count, *features.grid))
    keys = features.keys.new_zeros((features.keys.shape[1], *features.grid))
    covered = logits.new_zeros(features.grid)
    for window, window_logits, window_keys in zip(features.windows, logits, features.keys):
        cells = window.cells(features.stride)
        summed[(slice(None), *cells)] += window_logits
        keys[(slice(None), *cells)] += window_keys
        covered[cells] += 1
    covered = covered.clamp_min(1)
    return summed / covered, keys / covered


def _crop(pixels: torch.Tensor, window: Window) -> torch.Tensor:
    return pixels[:, window.top : window.top + window.height, window.left : window.left + window.width]
