"""The project page as one HTML document (no scripts, no external files) drawn from :func:`project_status`'s
dict, with the agreement plot as inline SVG."""

from __future__ import annotations

import html
from typing import Any

# One colour per model version, in the order versions first appear (MaskCLIP first, then each student).
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
PLOT_W, PLOT_H, MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 640, 260, 48, 16, 16, 40
RUNNING = 5  # the running mean's window, in annotations


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _num(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{float(value):.{digits}f}"


def agreement_plot(points: list[dict[str, Any]]) -> str:
    """IoU of each annotation with its proposal against annotation order, coloured by version, with a running
    mean: a student that reduced the correction work shows as the line rising where its colour starts."""
    inner_w, inner_h = PLOT_W - MARGIN_L - MARGIN_R, PLOT_H - MARGIN_T - MARGIN_B
    versions = list(dict.fromkeys(str(p.get("version")) for p in points))
    colour = {v: PALETTE[i % len(PALETTE)] for i, v in enumerate(versions)}
    n = len(points)
    x = lambda i: MARGIN_L + (inner_w * (i + 0.5) / n if n else 0)  # noqa: E731
    y = lambda iou: MARGIN_T + inner_h * (1 - float(iou))  # noqa: E731
    parts = [
        f'<svg id="agreement-plot" xmlns="http://www.w3.org/2000/svg" width="{PLOT_W}" height="{PLOT_H}" '
        f'viewBox="0 0 {PLOT_W} {PLOT_H}" role="img" aria-label="agreement with the proposal by annotation order">',
        f'<rect x="{MARGIN_L}" y="{MARGIN_T}" width="{inner_w}" height="{inner_h}" fill="#fafafa" stroke="#999"/>',
    ]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(
            f'<line x1="{MARGIN_L}" x2="{MARGIN_L + inner_w}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#ddd"/>'
            f'<text x="{MARGIN_L - 6}" y="{y(tick) + 4:.1f}" font-size="11" text-anchor="end">{tick:.2f}</text>'
        )
    parts.append(
        f'<text x="{MARGIN_L + inner_w / 2}" y="{PLOT_H - 8}" font-size="12" text-anchor="middle">'
        f"annotations in the order they were made ({n})</text>"
        f'<text x="12" y="{MARGIN_T + inner_h / 2}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 12 {MARGIN_T + inner_h / 2})">IoU with proposal</text>'
    )
    if not points:
        parts.append(
            f'<text x="{MARGIN_L + inner_w / 2}" y="{MARGIN_T + inner_h / 2}" font-size="13" text-anchor="middle" '
            'fill="#666">no annotation compared yet</text>'
        )
    previous = None
    for i, point in enumerate(points):
        version = str(point.get("version"))
        if previous is not None and version != previous:  # where a new model's proposals start
            parts.append(
                f'<line x1="{x(i) - inner_w / n / 2:.1f}" x2="{x(i) - inner_w / n / 2:.1f}" y1="{MARGIN_T}" '
                f'y2="{MARGIN_T + inner_h}" stroke="{colour[version]}" stroke-dasharray="4 3"/>'
            )
        previous = version
    if n >= 2:
        values = [float(p["iou"]) for p in points]
        windows = [values[max(0, i - RUNNING + 1) : i + 1] for i in range(n)]
        means = [sum(w) / len(w) for w in windows]
        line = " ".join(f"{x(i):.1f},{y(m):.1f}" for i, m in enumerate(means))
        parts.append(f'<polyline class="running-mean" points="{line}" fill="none" stroke="#333" stroke-width="1.5"/>')
    for i, point in enumerate(points):
        version = str(point.get("version"))
        parts.append(
            f'<circle class="point" cx="{x(i):.1f}" cy="{y(point["iou"]):.1f}" r="4" fill="{colour[version]}">'
            f"<title>annotation {_e(point.get('annotation'))} (task {_e(point.get('task'))}), {_e(version)}: "
            f"IoU {float(point['iou']):.3f}</title></circle>"
        )
    parts.append("</svg>")
    legend = " ".join(f'<span class="swatch" style="background:{colour[v]}"></span>{_e(v)}' for v in versions) + (
        f' <span class="swatch line"></span>running mean of {RUNNING}' if n >= 2 else ""
    )
    return "".join(parts) + f'<p class="legend">{legend}</p>'


def project_page(status: dict[str, Any]) -> str:
    project = status["project"]
    link = status["link"]
    link_note = (
        f'<p class="warning">{_e(link["message"])}</p>'
        if link["status"] != "linked"
        else f"<p>Label Studio: {_e(link.get('label_studio'))}; labels: {_e(', '.join(status['labels']) or '–')}; "
        f"proposals now come from <b>{_e(status['serving'])}</b>.</p>"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Project {_e(project)}: MaskCLIP backend</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; max-width: 70em; }}
table {{ border-collapse: collapse; margin: 0.4em 0 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; font-size: 0.92em; }}
th {{ background: #f0f0f0; }}
.warning {{ background: #fff3cd; border: 1px solid #e0c36a; padding: 0.5em; }}
.empty {{ color: #666; }}
.swatch {{ display: inline-block; width: 0.9em; height: 0.9em; margin: 0 0.3em 0 0.8em; vertical-align: middle; }}
.swatch.line {{ height: 0.15em; background: #333; }}
</style></head><body>
<h1>Project {_e(project)}</h1>
{link_note}
<p>Data as JSON: <a href="status">status</a> (generated {_e(status["generated"])}).</p>
<h2>Pre-annotation runs</h2>
{_runs(status)}
<h2>Models</h2>
{_versions(status["versions"])}
<h2>How much annotators change the proposals</h2>
{_agreement(status["agreement"])}
{agreement_plot(status["agreement_points"])}
<h2>Feature store and review</h2>
{_store(status["store"])}
{_review(status["review"])}
</body></html>
"""


def _table(head: list[str], rows: list[list[str]]) -> str:
    header = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{header}</tr>{body}</table>"


def _duration(seconds: Any) -> str:
    if seconds is None:
        return "–"
    seconds = int(float(seconds))
    return (
        f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m {seconds % 60:02d}s"
    )


def _runs(status: dict[str, Any]) -> str:
    note = f'<p class="warning">{_e(status["runs_note"])}</p>' if status.get("runs_note") else ""
    runs = status["runs"]
    if not runs:
        return note + '<p class="empty">No pre-annotation run is known (runs are kept a while after they end). '
        "Start one with <code>maskclip predict --project ID</code> or by importing tasks.</p>"
    rows = [
        [
            _e(r["run"]),
            _e(r["state"]),
            _e(r["version"]),
            f"{r['done']} / {r['total']}",
            _e(r["predicted"]),
            _e(r["failed"]),
            _e(r["skipped"]),
            f"{r['tasks_per_second']:.2f}/s",
            _duration(r["seconds_left"]),
            _e(r["started"]),
        ]
        for r in runs
    ]
    table = _table(
        ["run", "state", "version", "done", "predicted", "failed", "skipped", "rate", "time left", "started"], rows
    )
    failed = [(r["run"], f) for r in runs for f in r["failures"]]
    if failed:
        table += "<h3>Failed tasks</h3>" + _table(
            ["run", "task", "reason"], [[_e(run), _e(f["task"]), _e(f["reason"])] for run, f in failed]
        )
    return note + table


def _versions(versions: list[dict[str, Any]]) -> str:
    rows = []
    for v in versions:
        gate = v.get("gate")
        decision = (
            f"{_e(gate['decision'])}: gain [{_num(gate.get('gain_low'))}, {_num(gate.get('gain_high'))}] over "
            f"{_e(gate.get('baseline'))} ({_num(gate.get('baseline_miou'))}), margin {_num(gate.get('margin'), 2)}"
            if gate
            else "–"
        )
        rows.append(
            [
                _e(v["name"]),
                _e(v["model"]),
                "<b>active</b>" if v["active"] else "",
                _e(v["trained"] or "–"),
                _e("–" if v["annotations"] is None else v["annotations"]),
                _num(v["heldout_miou"]),
                decision,
            ]
        )
    note = "" if len(versions) > 1 else '<p class="empty">No student trained yet: MaskCLIP serves every proposal.</p>'
    return _table(["version", "model", "", "trained", "on annotations", "held-out mIoU", "gate"], rows) + note


def _agreement(summary: list[dict[str, Any]]) -> str:
    if not summary:
        return (
            '<p class="empty">No annotation compared yet. Every annotation submitted from now on is compared with '
            "its proposal; compare the existing ones with <code>maskclip agreement --project ID</code>.</p>"
        )
    rows = [
        [
            _e(a["version"]),
            _e(a["annotations"]),
            _num(a["mean_iou"]),
            _num(a["pixel_accuracy"]),
            f"{float(a['kept']):.0%}",
            _e(", ".join(f"{name} {iou:.2f}" for name, iou in a["per_label"].items()) or "–"),
        ]
        for a in summary
    ]
    return _table(["version", "annotations", "mean IoU", "pixel accuracy", "proposal kept", "IoU per label"], rows)


def _store(store: dict[str, Any]) -> str:
    if not store["enabled"]:
        size = "no feature store (MASKCLIP_FEATURE_STORE_GB is 0)"
    else:
        size = f"{store['entries']} entries, {_bytes(store['bytes'])}"
    rate = "–" if store["hit_rate"] is None else f"{store['hit_rate']:.0%}"
    return (
        f"<p>Feature store: {_e(size)}. Backbone lookups of this process: {store['from_memory']} from memory, "
        f"{store['from_store']} from the store, {store['computed']} computed (hit rate {rate}).</p>"
    )


def _bytes(count: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def _review(review: dict[str, Any] | None) -> str:
    if review is None:
        return '<p class="empty">No review yet: run <code>maskclip review --project ID</code> or train a student.</p>'
    counts = f": {review['annotations']} annotations, {review['flagged']} flagged" if "annotations" in review else ""
    name = _e(review.get("created") or review["folder"])
    return f'<p>Latest review <a href="../..{_e(review["url"])}">{name}</a>{counts}.</p>'
