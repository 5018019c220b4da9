"""``maskclip``: segment images from a terminal.

Other packages add subcommands through the ``maskclip.commands`` entry-point
group, so this module stays free of server and queue code.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from importlib.metadata import entry_points
from pathlib import Path

import click
from tqdm import tqdm

from .config import DENSE_MODES, KS_VARIANTS, MODES, PRECISIONS, SLIDE_REFINES, SegmentOptions
from .errors import MaskClipError
from .evaluation import (
    BACKGROUNDS,
    EvalConfig,
    config_predictor,
    evaluate_configs,
    load_sample,
    read_classes,
    read_voc,
    report_json,
    report_table,
)
from .images import decode_image, list_images
from .labels import LabelSet
from .segmenter import Segmenter
from .visualize import overlay, save_label_map


class _Commands(click.Group):
    """The built-in commands plus those other installed packages register."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | {ep.name for ep in entry_points(group="maskclip.commands")})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is not None:
            return command
        for ep in entry_points(group="maskclip.commands"):
            if ep.name == name:
                return ep.load()
        return None


@click.group(cls=_Commands)
@click.option("-v", "--verbose", is_flag=True, help="Log what the engine does.")
def main(verbose: bool) -> None:
    """MaskCLIP: zero-shot segmentation from a frozen CLIP model."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")


def model_options(func):
    """Options that choose the CLIP model, shared by every command that builds one."""
    options = [
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
            help="open_clip pretrained tag, or the path of a local checkpoint (.pt/.pth/.bin).",
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
    ]
    for option in reversed(options):
        func = option(func)
    return func


def refinement_options(func):
    """Refinement variants and PAMR; the command receives them as one ``refinement`` dict of SegmentOptions fields.

    Apply it right above the function, below every other option.
    """
    defaults = SegmentOptions()
    options = [
        click.option(
            "--ks-variant",
            type=click.Choice(KS_VARIANTS),
            default=defaults.key_smoothing_variant,
            show_default=True,
            help="Key smoothing: the paper's per-location cosine, or as MaskCLIP's released code computes it.",
        ),
        click.option(
            "--ks-threshold",
            type=float,
            default=defaults.ks_threshold,
            show_default=True,
            help="Released key smoothing changes only locations whose top probability is below this.",
        ),
        click.option(
            "--slide-refine",
            type=click.Choice(SLIDE_REFINES),
            default=defaults.slide_refine,
            show_default=True,
            help="Slide mode: refine once over the averaged windows, or inside each window and average "
            "the outputs (mmseg's slide inference).",
        ),
        click.option(
            "--pamr/--no-pamr",
            default=defaults.pamr,
            show_default=True,
            help="Move mask edges to the image's colour edges (pixel-adaptive refinement).",
        ),
        click.option("--pamr-iterations", type=int, default=defaults.pamr_iterations, show_default=True),
        click.option(
            "--pamr-stride",
            type=int,
            default=defaults.pamr_stride,
            show_default=True,
            help="PAMR works on a grid of this many pixels of the resized image.",
        ),
    ]

    @functools.wraps(func)
    def command(*args, ks_variant, ks_threshold, slide_refine, pamr, pamr_iterations, pamr_stride, **kwargs):
        refinement = {
            "key_smoothing_variant": ks_variant,
            "ks_threshold": ks_threshold,
            "slide_refine": slide_refine,
            "pamr": pamr,
            "pamr_iterations": pamr_iterations,
            "pamr_stride": pamr_stride,
        }
        return func(*args, refinement=refinement, **kwargs)

    for option in reversed(options):
        command = option(command)
    return command


@main.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--labels", required=True, help='Labels, comma-separated; synonyms with "|": "cat,dog|puppy,grass".')
@model_options
@click.option("--mode", type=click.Choice(MODES), default="whole", show_default=True)
@click.option(
    "--dense-mode",
    type=click.Choice(DENSE_MODES),
    default="maskclip",
    show_default=True,
    help="How the last ViT block makes dense features: MaskCLIP, SCLIP, ClearCLIP or NACLIP.",
)
@click.option("--short-side", type=int, default=SegmentOptions.short_side, show_default=True)
@click.option("--crop", type=int, default=SegmentOptions.crop, show_default=True, help="Window size (slide mode).")
@click.option("--stride", type=int, default=SegmentOptions.stride, show_default=True, help="Window step (slide mode).")
@click.option("--no-key-smoothing", is_flag=True, help="Turn key smoothing off.")
@click.option("--no-prompt-denoising", is_flag=True, help="Turn prompt denoising off.")
@click.option("--pd-threshold", type=float, default=SegmentOptions.pd_threshold, show_default=True)
@click.option(
    "--bg-threshold",
    type=float,
    default=SegmentOptions.bg_threshold,
    show_default=True,
    help="Pixels whose top probability is below this stay unlabeled.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder for the label maps, overlays and JSON summaries.",
)
@refinement_options
def segment(
    source: Path,
    labels: str,
    model: str,
    pretrained: str,
    device: str | None,
    precision: str,
    mode: str,
    dense_mode: str,
    short_side: int,
    crop: int,
    stride: int,
    no_key_smoothing: bool,
    no_prompt_denoising: bool,
    pd_threshold: float,
    bg_threshold: float,
    out_dir: Path,
    refinement: dict,
) -> None:
    """Segment an image, or every image in a folder, into LABELS.

    Writes NAME_labels.png (label indices), NAME_overlay.png (colours and a
    legend) and NAME.json (per-label scores and areas) for each image.
    """
    try:
        labelset = LabelSet.from_string(labels)
        options = SegmentOptions(
            mode=mode,
            dense_mode=dense_mode,
            short_side=short_side,
            crop=crop,
            stride=stride,  # type: ignore[arg-type]
            key_smoothing=not no_key_smoothing,
            prompt_denoising=not no_prompt_denoising,
            pd_threshold=pd_threshold,
            bg_threshold=bg_threshold,
            **refinement,
        )
    except MaskClipError as exc:
        raise click.UsageError(str(exc)) from exc
    files = list_images(source)
    if not files:
        raise click.UsageError(f"{source} holds no images ({', '.join(('.jpg', '.png', '...'))}).")
    try:
        segmenter = Segmenter.from_pretrained(model, pretrained, device, precision, options=options)
    except MaskClipError as exc:
        raise click.ClickException(str(exc)) from exc

    out_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in tqdm(files, desc="segmenting", unit="image", disable=len(files) == 1 or None):
        try:
            _segment_one(segmenter, path, labelset, out_dir)
        except (MaskClipError, OSError) as exc:
            failed += 1
            tqdm.write(f"error: {path}: {exc}", file=sys.stderr)
    click.echo(f"{len(files) - failed} of {len(files)} image(s) segmented into {out_dir}", err=True)
    if failed:
        sys.exit(1)


@main.command("eval")
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@model_options
@click.option("--split", default="val", show_default=True, help="ImageSets/Segmentation/<split>.txt, if present.")
@click.option(
    "--classes",
    "classes_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Class names, one per line, index order ('a|b' for synonyms). Default: classes.txt, else VOC's 21.",
)
@click.option(
    "--background",
    type=click.Choice(BACKGROUNDS),
    default="threshold",
    show_default=True,
    help="threshold: class 0 is background, given to pixels below --bg-threshold; class: class 0 is "
    "prompted like the others; none: every class is prompted, nothing is background.",
)
@click.option("--bg-threshold", type=float, default=0.5, show_default=True)
@click.option("--ignore-index", type=int, default=255, show_default=True)
@click.option(
    "--reduce-zero-label",
    is_flag=True,
    help="Ignore label 0 and shift the others down (VOC-20 and Context-59 protocols).",
)
@click.option(
    "--config",
    "configs",
    multiple=True,
    help='A configuration to score, e.g. "sclip", "dense_mode=naclip,key_smoothing=false", '
    '"name=mine,student=models/project-3/v2.pt". Repeat to compare side by side.',
)
@click.option("--mode", type=click.Choice(MODES), default="whole", show_default=True)
@click.option("--short-side", type=int, default=SegmentOptions.short_side, show_default=True)
@click.option("--crop", type=int, default=SegmentOptions.crop, show_default=True)
@click.option("--stride", type=int, default=SegmentOptions.stride, show_default=True)
@click.option("--logit-scale", type=float, default=SegmentOptions.logit_scale, show_default=True)
@click.option("--limit", type=int, default=None, help="Only the first N samples.")
@click.option(
    "--out",
    "out_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("eval.json"),
    show_default=True,
    help="The JSON report.",
)
@refinement_options
def evaluate(
    data: Path,
    model: str,
    pretrained: str,
    device: str | None,
    precision: str,
    split: str,
    classes_file: Path | None,
    background: str,
    bg_threshold: float,
    ignore_index: int,
    reduce_zero_label: bool,
    configs: tuple[str, ...],
    mode: str,
    short_side: int,
    crop: int,
    stride: int,
    logit_scale: float,
    limit: int | None,
    out_file: Path,
    refinement: dict,
) -> None:
    """mIoU, per-class IoU and pixel accuracy on a dataset in PASCAL VOC layout."""
    try:
        classes = read_classes(classes_file, data)
        entries = read_voc(data, split, limit)
        options = SegmentOptions(
            mode=mode,
            short_side=short_side,
            crop=crop,
            stride=stride,  # type: ignore[arg-type]
            logit_scale=logit_scale,
            **refinement,
        )
        parsed = [EvalConfig.parse(text) for text in configs] or [EvalConfig("default")]
        segmenter = Segmenter.from_pretrained(model, pretrained, device, precision, options=options)
        predictors = {c.name: config_predictor(segmenter, c, classes, background, bg_threshold) for c in parsed}
    except MaskClipError as exc:
        raise click.ClickException(str(exc)) from exc
    samples = (load_sample(i, image, label, ignore_index, reduce_zero_label) for i, image, label in entries)
    results = evaluate_configs(
        predictors,
        samples,
        len(classes),
        progress=lambda it: tqdm(it, total=len(entries), desc="evaluating", unit="image", disable=None),
    )
    click.echo(report_table(results, classes))
    out_file.write_text(
        report_json(
            results,
            classes,
            dataset=str(data),
            split=split,
            samples=len(entries),
            model=model,
            weights=pretrained,
            background=background,
            bg_threshold=bg_threshold,
            protocol=options.to_dict(),
        )
    )
    click.echo(f"report written to {out_file}", err=True)


def _segment_one(segmenter: Segmenter, path: Path, labelset: LabelSet, out_dir: Path) -> None:
    rgb = decode_image(path)
    result = segmenter.segment(rgb, labelset)
    stem = path.stem
    encoding = save_label_map(result, out_dir / f"{stem}_labels.png")
    overlay(rgb, result).save(out_dir / f"{stem}_overlay.png")
    summary = {
        "image": str(path),
        "model": segmenter.clip.spec.model,
        "weights": segmenter.clip.weights_id,
        "options": segmenter.options.to_dict(),
        "label_map": {"file": f"{stem}_labels.png", "encoding": encoding},
        "overlay": f"{stem}_overlay.png",
        **result.to_dict(),
    }
    (out_dir / f"{stem}.json").write_text(json.dumps(summary, indent=2))


__all__ = ["main", "model_options"]
