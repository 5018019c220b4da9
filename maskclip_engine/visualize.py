"""Pictures of results: label-map PNGs and colour overlays with a legend."""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from maskclip_engine.result import SegmentationResult

UNLABELED_8BIT = 255
UNLABELED_16BIT = 65535


def palette(count: int) -> np.ndarray:
    """``[count, 3] uint8`` colours, well apart in hue, the same for the same count."""
    colours = []
    for i in range(count):
        hue = (i * 0.618033988749895) % 1.0  # golden-ratio steps keep neighbours apart
        lightness = 0.5 if i % 2 == 0 else 0.4
        colours.append(colorsys.hls_to_rgb(hue, lightness, 0.85))
    return (np.array(colours, dtype=np.float64).reshape(count, 3) * 255).round().astype(np.uint8)


def save_label_map(result: SegmentationResult, path: Path) -> str:
    """Write the label map: index ``i`` for ``labels[i]``; returns how unlabeled pixels are stored.

    Up to 255 labels give an 8-bit palette PNG (unlabeled = 255, as in PASCAL
    VOC); more give a 16-bit grey PNG (unlabeled = 65535).
    """
    label_map = result.label_map
    if len(result.labels) < UNLABELED_8BIT:
        data = np.where(label_map < 0, UNLABELED_8BIT, label_map).astype(np.uint8)
        image = Image.fromarray(data, mode="P")
        colours = np.zeros((256, 3), dtype=np.uint8)
        colours[: len(result.labels)] = palette(len(result.labels))
        image.putpalette(colours.ravel().tolist())
        image.save(path)
        return f"8-bit palette PNG, unlabeled = {UNLABELED_8BIT}"
    data = np.where(label_map < 0, UNLABELED_16BIT, label_map).astype(np.uint16)
    Image.fromarray(data).save(path)
    return f"16-bit PNG, unlabeled = {UNLABELED_16BIT}"


def overlay(image: np.ndarray, result: SegmentationResult, alpha: float = 0.5) -> Image.Image:
    """The image with each label's pixels tinted, and a legend of present labels on the right."""
    colours = palette(len(result.labels))
    label_map = result.label_map
    tinted = image.astype(np.float32)
    labeled = label_map >= 0
    tinted[labeled] = (1 - alpha) * tinted[labeled] + alpha * colours[label_map[labeled]]
    picture = Image.fromarray(tinted.round().astype(np.uint8))

    size = max(12, min(28, picture.height // 24))
    font = ImageFont.load_default(size=size)
    counts = result.pixel_counts()
    total = max(1, label_map.size)
    rows = [
        (colours[i], f"{name}  {counts[i] / total:.0%}  score {result.scores[i]:.2f}")
        for i, name in enumerate(result.labels)
        if counts[i] > 0
    ]
    rows += [(None, f"dropped: {name}") for name in result.dropped]
    if not rows:
        rows = [(None, "no label found")]
    line = int(size * 1.5)
    text_width = max(int(ImageDraw.Draw(picture).textlength(text, font=font)) for _, text in rows)
    legend_width = size * 2 + text_width + size
    canvas = Image.new("RGB", (picture.width + legend_width, max(picture.height, line * len(rows) + size)), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, (colour, text) in enumerate(rows):
        top = size // 2 + row * line
        left = picture.width + size // 2
        if colour is not None:
            draw.rectangle([left, top, left + size, top + size], fill=tuple(int(c) for c in colour), outline="black")
        draw.text((left + int(size * 1.5), top), text, fill="black" if colour is not None else "grey", font=font)
    return canvas
