"""``maskclip``: segment images from a terminal.

Other packages add subcommands through the ``maskclip.commands`` entry-point
group, so this module stays free of server and queue code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from importlib.metadata import entry_points
from pathlib import Path

import click
import numpy as np
from click.core import ParameterSource
from tqdm import tqdm

from maskclip_engine.cli.options import feature_store_options, model_options, refinement_options, window_options
from maskclip_engine.config import SegmentOptions
from maskclip_engine.errors import MaskClipError
from maskclip_engine.evaluation.evaluate import (
    BACKGROUNDS,
    EvalConfig,
    EvalSpec,
    config_predictor,
    evaluate_configs,
    load_sample,
    read_classes,
    read_voc,
    report_json,
    report_table,
)
from maskclip_engine.evaluation.harness import Harness
from maskclip_engine.evaluation.protocols import Protocol, load_protocol, protocol_names
from maskclip_engine.features.source import FeatureSource
from maskclip_engine.images import decode_image, list_images
from maskclip_engine.labels import LabelSet
from maskclip_engine.result import SegmentationResult
from maskclip_engine.segmenter import Segmenter
from maskclip_engine.visualize import overlay, save_label_map


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


@main.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--labels", required=True, help='Labels, comma-separated; synonyms with "|": "cat,dog|puppy,grass".')
@model_options
@window_options
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
@feature_store_options
@refinement_options
def segment(
    source: Path,
    labels: str,
    model: str,
    pretrained: str,
    device: str | None,
    precision: str,
    window: dict,
    no_key_smoothing: bool,
    no_prompt_denoising: bool,
    pd_threshold: float,
    bg_threshold: float,
    out_dir: Path,
    features: FeatureSource,
    refinement: dict,
) -> None:
    """Segment an image, or every image in a folder, into LABELS.

    Writes NAME_labels.png (label indices), NAME_overlay.png (colours and a
    legend) and NAME.json (per-label scores and areas) for each image.
    """
    try:
        labelset = LabelSet.from_string(labels)
        options = SegmentOptions(
            **window,
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
        segmenter = Segmenter.from_pretrained(model, pretrained, device, precision, options=options, features=features)
    except MaskClipError as exc:
        raise click.ClickException(str(exc)) from exc

    out_dir.mkdir(parents=True, exist_ok=True)
    failed = _segment_files(segmenter, files, labelset, out_dir, options.batch_size)
    click.echo(f"{len(files) - failed} of {len(files)} image(s) segmented into {out_dir}", err=True)
    if failed:
        sys.exit(1)


@main.command("eval")
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--protocol",
    default=None,
    help=f"A published set-up to reproduce: {', '.join(protocol_names())}, or a protocol JSON file. "
    "Options given here override it.",
)
@model_options
@click.option("--split", default="val", show_default=True, help="ImageSets/Segmentation/<split>.txt, if present.")
@click.option(
    "--classes",
    "classes_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Class names, one per line, index order ('a|b' for synonyms). Default: the protocol's, classes.txt, "
    "else VOC's 21.",
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
@window_options
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
@feature_store_options
@refinement_options
@click.pass_context
def evaluate(ctx: click.Context, data: Path, protocol: str | None, out_file: Path, **given) -> None:
    """mIoU, per-class IoU and pixel accuracy on a dataset in PASCAL VOC layout."""
    try:
        spec = _eval_spec(ctx, given, load_protocol(protocol) if protocol else None)
        classes = spec.classes or read_classes(given["classes_file"], data)
        entries = read_voc(data, spec.split, given["limit"])
        segmenter = Segmenter.from_pretrained(
            given["model"],
            given["pretrained"],
            given["device"],
            given["precision"],
            options=spec.options,
            features=given["features"],
        )
        predictors = {
            c.name: config_predictor(segmenter, c, classes, spec.background, spec.bg_threshold, spec.harness)
            for c in spec.configs
        }
    except MaskClipError as exc:
        raise click.ClickException(str(exc)) from exc
    samples = (load_sample(i, image, label, spec.ignore_index, spec.reduce_zero_label) for i, image, label in entries)
    results = evaluate_configs(
        predictors,
        samples,
        len(classes),
        progress=lambda it: tqdm(it, total=len(entries), desc="evaluating", unit="image", disable=None),
    )
    click.echo(report_table(results, classes, spec.published))
    context = {
        "dataset": str(data),
        "split": spec.split,
        "samples": len(entries),
        "model": given["model"],
        "weights": given["pretrained"],
        "background": spec.background,
        "bg_threshold": spec.bg_threshold,
        "protocol": spec.options.to_dict(),
    }
    if spec.harness is not None:
        context["harness"] = dataclasses.asdict(spec.harness)
    if spec.protocol is not None:
        context["protocol_name"] = spec.protocol.name
        context["published"] = {"miou": spec.published, "source": spec.protocol.source}
    out_file.write_text(report_json(results, classes, **context))
    click.echo(f"report written to {out_file}", err=True)


def _eval_spec(ctx: click.Context, given: dict, protocol: Protocol | None) -> EvalSpec:
    """What to evaluate: each value as given on the command line, else the protocol's, else the default."""

    def pick(name: str, from_protocol):
        explicit = ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)
        return given[name] if explicit or protocol is None else from_protocol

    options = dict(protocol.options) if protocol is not None else {}
    names = {"ks_variant": "key_smoothing_variant"}
    for group in ("window", "refinement"):
        for parameter_field, value in given[group].items():
            parameter = next((k for k, v in names.items() if v == parameter_field), parameter_field)
            if protocol is None or ctx.get_parameter_source(parameter) not in (ParameterSource.DEFAULT, None):
                options[parameter_field] = value
    if protocol is None or ctx.get_parameter_source("logit_scale") not in (ParameterSource.DEFAULT, None):
        options["logit_scale"] = given["logit_scale"]
    texts = given["configs"] or (protocol.configs if protocol is not None else ()) or ("default",)
    configs = [EvalConfig("default") if t == "default" else EvalConfig.parse(t) for t in texts]
    return EvalSpec(
        classes=list(protocol.classes) if protocol is not None and given["classes_file"] is None else None,
        split=pick("split", protocol.split if protocol else None),
        background=pick("background", protocol.background if protocol else None),
        bg_threshold=pick("bg_threshold", protocol.bg_threshold if protocol else None),
        ignore_index=pick("ignore_index", protocol.ignore_index if protocol else None),
        reduce_zero_label=pick("reduce_zero_label", protocol.reduce_zero_label if protocol else None),
        options=SegmentOptions(**options),
        configs=configs,
        published=dict(protocol.published) if protocol is not None else {},
        protocol=protocol,
        harness=Harness(**protocol.harness) if protocol is not None and protocol.harness else None,
    )


def _segment_files(segmenter: Segmenter, files: list[Path], labelset: LabelSet, out_dir: Path, batch: int) -> int:
    """Segment ``files`` ``batch`` at a time; returns how many failed (each is reported, none stops the rest).

    While one batch is on the device, the next one is decoded and the previous
    one's outputs are written, each on a thread of its own.
    """
    groups = [files[first : first + batch] for first in range(0, len(files), batch)]
    failures = 0
    bar = tqdm(total=len(files), desc="segmenting", unit="image", disable=len(files) == 1 or None)

    def failed(path: Path, exc: BaseException) -> None:
        nonlocal failures
        failures += 1
        tqdm.write(f"error: {path}: {exc}", file=sys.stderr)
        bar.update()

    def settle(writes: list[tuple[Path, Future]]) -> None:
        for path, write in writes:
            try:
                write.result()
                bar.update()
            except (MaskClipError, OSError) as exc:
                failed(path, exc)

    with bar, ThreadPoolExecutor(1, thread_name_prefix="decode") as decoder:
        with ThreadPoolExecutor(1, thread_name_prefix="write") as writer:
            upcoming = decoder.submit(_decode_all, groups[0]) if groups else None
            writes: list[tuple[Path, Future]] = []
            for number in range(len(groups)):
                decoded = upcoming.result()  # type: ignore[union-attr]
                upcoming = decoder.submit(_decode_all, groups[number + 1]) if number + 1 < len(groups) else None
                good = []
                for path, rgb in decoded:
                    if isinstance(rgb, Exception):
                        failed(path, rgb)
                    else:
                        good.append((path, rgb))
                results = _segment_group(segmenter, good, labelset, failed)
                settle(writes)  # the previous batch's, written while this one was on the device
                writes = [
                    (path, writer.submit(_write_outputs, segmenter, path, rgb, result, out_dir))
                    for (path, rgb), result in zip(good, results)
                    if result is not None
                ]
            settle(writes)
    return failures


def _decode_all(paths: list[Path]) -> list[tuple[Path, np.ndarray | Exception]]:
    """Each path's pixels, or the error that says why it has none."""
    decoded: list[tuple[Path, np.ndarray | Exception]] = []
    for path in paths:
        try:
            decoded.append((path, decode_image(path)))
        except (MaskClipError, OSError) as exc:
            decoded.append((path, exc))
    return decoded


def _segment_group(
    segmenter: Segmenter, group: list[tuple[Path, np.ndarray]], labelset: LabelSet, failed: Callable
) -> list[SegmentationResult | None]:
    """One batch's results; should the batch fail, each image on its own, so one bad image fails alone."""
    try:
        return list(segmenter.segment_batch([rgb for _, rgb in group], labelset))
    except MaskClipError:
        results: list[SegmentationResult | None] = []
        for path, rgb in group:
            try:
                results.append(segmenter.segment(rgb, labelset))
            except MaskClipError as exc:
                failed(path, exc)
                results.append(None)
        return results


def _write_outputs(
    segmenter: Segmenter, path: Path, rgb: np.ndarray, result: SegmentationResult, out_dir: Path
) -> None:
    """NAME_labels.png, NAME_overlay.png and NAME.json of one segmented image."""
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


__all__ = ["main"]
