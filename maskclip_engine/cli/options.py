"""Option groups the ``maskclip`` commands share, each declared once.

Every group gathers its options into one keyword argument of the command
(``window``, ``refinement``: dicts of :class:`SegmentOptions` fields;
``features``: a :class:`FeatureSource`), so commands list none of them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import click

from maskclip_engine.config import DENSE_MODES, KS_VARIANTS, MODES, PRECISIONS, SLIDE_REFINES, SegmentOptions

DEFAULTS = SegmentOptions()


def _apply(options: list, func: Callable) -> Callable:
    for option in reversed(options):
        func = option(func)
    return func


def model_options(func: Callable) -> Callable:
    """Options that choose the CLIP model, shared by every command that builds one."""
    return _apply(
        [
            click.option(
                "--model",
                envvar="MASKCLIP_MODEL",
                default="ViT-B-16",
                show_default=True,
                help="open_clip architecture name, or the path of an open_clip model config JSON.",
            ),
            click.option(
                "--pretrained",
                envvar="MASKCLIP_PRETRAINED",
                default="openai",
                show_default=True,
                help="open_clip pretrained tag, or a local checkpoint (.pt, .pth, .bin, .safetensors, .ckpt).",
            ),
            click.option("--device", envvar="MASKCLIP_DEVICE", default=None, help="cpu, cuda, cuda:N (default: auto)."),
            click.option(
                "--precision",
                envvar="MASKCLIP_PRECISION",
                type=click.Choice(PRECISIONS),
                default="auto",
                show_default=True,
                help="Image backbone precision; auto: bf16 where the chip computes it natively, else fp32.",
            ),
        ],
        func,
    )


def _grouped(func: Callable, names: dict[str, str], keyword: str, options: list) -> Callable:
    """Options whose values reach ``func`` as one dict ``keyword`` of SegmentOptions fields (``names``)."""

    @functools.wraps(func)
    def command(*args, **kwargs):
        group = {field: kwargs.pop(parameter) for parameter, field in names.items()}
        return func(*args, **{keyword: group}, **kwargs)

    return _apply(options, command)


def window_options(func: Callable) -> Callable:
    """How the image is resized and cut into windows, and how the last ViT block makes dense features."""
    names = {"mode": "mode", "dense_mode": "dense_mode", "short_side": "short_side", "crop": "crop", "stride": "stride"}
    return _grouped(
        func,
        names,
        "window",
        [
            click.option("--mode", type=click.Choice(MODES), default=DEFAULTS.mode, show_default=True),
            click.option(
                "--dense-mode",
                type=click.Choice(DENSE_MODES),
                default=DEFAULTS.dense_mode,
                show_default=True,
                help="How the last ViT block makes dense features (docs/dense-modes.md).",
            ),
            click.option("--short-side", type=int, default=DEFAULTS.short_side, show_default=True),
            click.option("--crop", type=int, default=DEFAULTS.crop, show_default=True, help="Window size (slide)."),
            click.option("--stride", type=int, default=DEFAULTS.stride, show_default=True, help="Window step (slide)."),
        ],
    )


def refinement_options(func: Callable) -> Callable:
    """Refinement variants and PAMR."""
    names = {
        "ks_variant": "key_smoothing_variant",
        "ks_threshold": "ks_threshold",
        "slide_refine": "slide_refine",
        "pamr": "pamr",
        "pamr_iterations": "pamr_iterations",
        "pamr_stride": "pamr_stride",
    }
    return _grouped(
        func,
        names,
        "refinement",
        [
            click.option(
                "--ks-variant",
                type=click.Choice(KS_VARIANTS),
                default=DEFAULTS.key_smoothing_variant,
                show_default=True,
                help="Key smoothing: the paper's per-location cosine, or as MaskCLIP's released code computes it.",
            ),
            click.option(
                "--ks-threshold",
                type=float,
                default=DEFAULTS.ks_threshold,
                show_default=True,
                help="Released key smoothing changes only locations whose top probability is below this.",
            ),
            click.option(
                "--slide-refine",
                type=click.Choice(SLIDE_REFINES),
                default=DEFAULTS.slide_refine,
                show_default=True,
                help="Slide mode: refine once over the averaged windows, or inside each window and average "
                "the outputs (mmseg's slide inference).",
            ),
            click.option(
                "--pamr/--no-pamr",
                default=DEFAULTS.pamr,
                show_default=True,
                help="Move mask edges to the image's colour edges (pixel-adaptive refinement).",
            ),
            click.option("--pamr-iterations", type=int, default=DEFAULTS.pamr_iterations, show_default=True),
            click.option(
                "--pamr-stride",
                type=int,
                default=DEFAULTS.pamr_stride,
                show_default=True,
                help="PAMR works on a grid of this many pixels of the resized image.",
            ),
        ],
    )


def feature_store_options(func: Callable) -> Callable:
    """Where image features are kept between runs (``features``: the command's FeatureSource)."""

    @functools.wraps(func)
    def command(*args, feature_store: Path | None, feature_store_gb: float, **kwargs):
        from maskclip_engine.features.source import FeatureSource
        from maskclip_engine.features.store import FeatureStore

        store = FeatureStore.sized(feature_store, feature_store_gb) if feature_store is not None else None
        return func(*args, features=FeatureSource(None, store), **kwargs)

    return _apply(
        [
            click.option(
                "--feature-store",
                envvar="MASKCLIP_FEATURE_STORE",
                type=click.Path(file_okay=False, path_type=Path),
                default=None,
                help="Keep each image's backbone output here and reuse it (default: off).",
            ),
            click.option(
                "--feature-store-gb",
                envvar="MASKCLIP_FEATURE_STORE_GB",
                type=float,
                default=10.0,
                show_default=True,
                help="The store's size bound; the least recently used entries go first.",
            ),
        ],
        command,
    )
