"""A review as files: ``review.json`` (every annotation, most suspect first) and ``index.html``, which shows the
most suspect ones as pictures: the image, the annotation, and the suspect pixels with the label the models
expect there."""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from maskclip_engine.atomic import atomic_write
from maskclip_engine.review.confident_learning import AnnotationReview
from maskclip_engine.visualize import palette

SUSPECT = np.array([255, 0, 255], dtype=np.float64)  # magenta: stands out against every label colour
PICTURE_SIDE = 320  # each of the three panels is scaled to at most this many pixels on its long side


@dataclass(frozen=True)
class ReviewedItem:
    """What the report says of one reviewed annotation: where it lives in Label Studio, and its pixels."""

    task: int
    annotation: int
    image: np.ndarray  # HxWx3 uint8
    labels: np.ndarray  # HxW int, -1 unlabelled


def write_report(
    folder: Path,
    reviews: Sequence[AnnotationReview],
    items: Sequence[ReviewedItem],
    names: Sequence[str],
    summary: dict,
    task_link: Callable[[int], str] | None = None,
    pictures: int = 50,
) -> dict:
    """Write ``review.json``, ``index.html`` and ``images/`` (the ``pictures`` most suspect) into ``folder``."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    colours = palette(len(names))
    rows = []
    for rank, review in enumerate(reviews):
        item = items[review.index]
        row = {
            "task": item.task,
            "annotation": item.annotation,
            "score": review.score,
            "labels": review.labels,
            "expects": review.expects,
            "flagged": review.score < summary.get("flag_below", 0.5),
            "suspect_pixels": int(review.suspect.sum()),
        }
        if task_link is not None:
            row["link"] = task_link(item.task)
        if rank < pictures:
            row["picture"] = f"images/task-{item.task}-annotation-{item.annotation}.png"
            picture = composite(item, review, names, colours)
            atomic_write(folder / row["picture"], lambda handle, p=picture: p.save(handle, format="PNG"))
        rows.append(row)
    document = {**summary, "annotations": rows}
    atomic_write(folder / "review.json", lambda handle: handle.write(json.dumps(document, indent=2).encode()))
    atomic_write(folder / "index.html", lambda handle: handle.write(page(document, names, colours).encode()))
    return document


def composite(item: ReviewedItem, review: AnnotationReview, names: Sequence[str], colours: np.ndarray) -> Image.Image:
    """Three panels side by side: the image, the annotation over it, the suspect pixels and what is expected."""
    image = item.image.astype(np.float64)
    labels = _fit(item.labels, item.image.shape[:2])
    suspect = _fit(review.suspect.astype(np.int64), item.image.shape[:2]) > 0
    expected = _fit(review.expected, item.image.shape[:2])
    annotated = _tint(image, labels, colours)
    judged = _tint(image * 0.6, expected, colours, alpha=0.45)
    judged[suspect] = 0.35 * judged[suspect] + 0.65 * SUSPECT
    panels = [Image.fromarray(p.clip(0, 255).astype(np.uint8)) for p in (image, annotated, judged)]
    scale = PICTURE_SIDE / max(item.image.shape[:2])
    size = (max(1, round(item.image.shape[1] * scale)), max(1, round(item.image.shape[0] * scale)))
    panels = [p.resize(size, Image.NEAREST) for p in panels]
    caption = 22
    canvas = Image.new("RGB", (size[0] * 3 + 8, size[1] + caption), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=13)
    for i, (panel, text) in enumerate(zip(panels, ("image", "annotation", "suspect (magenta), expected labels"))):
        canvas.paste(panel, (i * (size[0] + 4), caption))
        draw.text((i * (size[0] + 4) + 2, 4), text, fill="black", font=font)
    return canvas


def _fit(grid: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if grid.shape == shape:
        return grid
    resized = Image.fromarray(grid.astype(np.int32)).resize((shape[1], shape[0]), Image.NEAREST)
    return np.asarray(resized).astype(np.int64)


def _tint(image: np.ndarray, labels: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    out = image.copy()
    inside = labels >= 0
    out[inside] = (1 - alpha) * out[inside] + alpha * colours[labels[inside]]
    return out


def page(document: dict, names: Sequence[str], colours: np.ndarray) -> str:
    """The review as one HTML page (no scripts, no external files but its pictures)."""
    legend = " ".join(
        f'<span class="swatch" style="background:rgb{tuple(int(c) for c in colours[i])}"></span>{html.escape(n)}'
        for i, n in enumerate(names)
    )
    cards = [_card(row) for row in document["annotations"] if "picture" in row]
    flagged = sum(row["flagged"] for row in document["annotations"])
    title = f"Annotation review: project {document.get('project', '')}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
.card {{ border: 1px solid #ccc; border-radius: 6px; padding: 0.6em; margin: 0 0 1em 0; }}
.card.flagged {{ border-color: #c0c; }}
.swatch {{ display: inline-block; width: 0.9em; height: 0.9em; margin: 0 0.3em 0 0.8em; vertical-align: middle; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p><a href="../../projects/{html.escape(str(document.get("project", "")))}/">The project's page</a>: runs, models.</p>
<p>{len(document["annotations"])} annotations judged by {html.escape(str(document.get("judge", "")))}
({html.escape(str(document.get("created", "")))}); {flagged} flagged as probably wrong (score below
{document.get("flag_below", "")}). Most suspect first; 0 means surely wrong, 1 consistent.</p>
<p>Labels: {legend}</p>
{"".join(cards)}
</body></html>
"""


def _card(row: dict) -> str:
    details = ", ".join(
        f"{html.escape(label)}: {fraction:.0%} suspect"
        + (f" (expected {html.escape(row['expects'][label])})" if label in row["expects"] else "")
        for label, fraction in row["labels"].items()
        if fraction > 0
    )
    link = f' <a href="{html.escape(row["link"])}">open in Label Studio</a>' if "link" in row else ""
    flagged = " flagged" if row["flagged"] else ""
    return f"""<div class="card{flagged}">
<p><b>task {row["task"]}</b>, annotation {row["annotation"]}: score {row["score"]:.2f}{link}<br>
{details or "no suspect pixels"}</p>
<img src="{html.escape(row["picture"])}" alt="task {row["task"]}: image, annotation, suspect pixels">
</div>
"""


REVIEWS = "reviews"
LATEST = "latest.json"


def new_review_folder(model_dir: Path, project: int | str, stamp: str) -> Path:
    """``MODEL_DIR/project-N/reviews/<stamp>/`` for a review about to be written."""
    folder = Path(model_dir) / f"project-{project}" / REVIEWS / stamp
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def mark_latest(folder: Path) -> None:
    """Point the project's ``latest.json`` at a complete review (written last, atomically)."""
    pointer = folder.parent / LATEST
    atomic_write(pointer, lambda handle: handle.write(json.dumps({"review": folder.name}).encode()))


def latest_review(model_dir: Path, project: int | str) -> Path | None:
    """The folder of the project's latest complete review, or ``None``."""
    reviews = Path(model_dir) / f"project-{project}" / REVIEWS
    try:
        name = json.loads((reviews / LATEST).read_text()).get("review")
    except (OSError, ValueError, AttributeError):
        return None
    folder = reviews / str(name)
    return folder if isinstance(name, str) and "/" not in name and (folder / "index.html").is_file() else None
