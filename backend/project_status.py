"""Everything the project page shows, gathered into one JSON-safe dict (``GET /projects/<id>/status``); the HTML
page (:mod:`backend.project_page_html`) is drawn from the same dict, so the two never disagree.

The sources: pre-annotation runs in Redis (:mod:`maskclip_service.preannotation_runs`), the project's students
and their gate numbers (:class:`~maskclip_engine.students.registry.ModelRegistry`), agreement records
(:mod:`ls_integration.agreement`), the feature store and the latest review. Each source that cannot be read
leaves its part empty with a sentence saying why, never the whole page.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

from ls_integration.agreement import AgreementRecords, summarise
from ls_integration.label_config import ProjectSchema, SchemaCache
from ls_integration.predictor import Predictor
from maskclip_engine.review.report import latest_review
from maskclip_service import preannotation_runs
from maskclip_service.settings import Settings

RUN_FIELDS = ("total", "done", "predicted", "failed", "skipped")
GATE_FIELDS = ("held_out_miou", "baseline", "baseline_miou", "gain_low", "gain_high", "held_out_pixels")


class UnknownProjectError(LookupError):
    """Nothing here knows the project: no link, no folder under MODEL_DIR, no run."""


def project_status(
    project: int,
    settings: Settings,
    predictor: Predictor,
    schemas: SchemaCache,
    connection: Redis | None,
) -> dict[str, Any]:
    """The page's data for ``project``; raises :class:`UnknownProjectError` when nothing knows it."""
    link = predictor.project_link(str(project))
    folder = Path(settings.model_dir) / f"project-{project}"
    runs, runs_note = _runs(connection, project)
    if link is None and not folder.is_dir() and not runs:
        raise UnknownProjectError(
            f"project {project} is unknown here: connect this model to it in Label Studio (Settings > Model), "
            "which calls /setup, or pre-annotate it with `maskclip predict --project ID`."
        )
    schema = _schema(schemas, link.label_config if link else None)
    serving = predictor.project_version(str(project), schema)
    records = AgreementRecords(settings.model_dir, project).records()
    return {
        "project": project,
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "link": _link(project, link),
        "labels": list(schema.controls[0].labels) if schema else [],
        "serving": serving,
        "runs": runs,
        "runs_note": runs_note,
        "versions": _versions(project, predictor, schema, serving, settings.gate_margin),
        "agreement": summarise(records),
        "agreement_points": [
            {"annotation": r["annotation"], "task": r.get("task"), "version": r.get("version"), "iou": r["mean_iou"]}
            for r in records
        ],
        "store": _store(predictor),
        "review": _review(settings.model_dir, project),
    }


def _schema(schemas: SchemaCache, config: str | None) -> ProjectSchema | None:
    if not config:
        return None
    try:
        return schemas.get(config)
    except Exception:  # a config this backend cannot predict for: the page still shows the rest
        return None


def _link(project: int, link: Any) -> dict[str, Any]:
    if link is None:
        return {
            "status": "missing",
            "message": f"this backend has no link to project {project} any more (link.json is gone): its history "
            "below is kept, but new work needs the model connected again in Label Studio (Settings > Model).",
        }
    return {"status": "linked", "label_studio": link.hostname}  # never the access token


def _runs(connection: Redis | None, project: int) -> tuple[list[dict[str, Any]], str | None]:
    if connection is None:
        return [], "no queue (REDIS_URL is not set): pre-annotation runs are not tracked"
    try:
        found = [r for r in preannotation_runs.runs(connection, limit=500) if str(r.get("project")) == str(project)]
        out = []
        for run in found:
            failures = preannotation_runs.failures(connection, str(run["run"])) if run.get("failed") else []
            out.append(_run_row(run, failures))
        return out, None
    except RedisError as exc:
        return [], f"the queue is unreachable, so runs are missing: {exc}"


def _run_row(run: dict[str, Any], failures: list[dict[str, Any]]) -> dict[str, Any]:
    phase = str(run.get("phase", "queued"))
    state = "finished" if phase == "done" else phase
    counts = {k: int(run.get(k, 0) or 0) for k in RUN_FIELDS}
    rate = float(run.get("tasks_per_second", 0) or 0)
    left = max(counts["total"] - counts["done"], 0)
    seconds_left = None if state == "finished" or rate <= 0 else round(left / rate, 1)
    return {
        "run": run["run"],
        "state": state,
        "version": run.get("version"),
        "trigger": run.get("trigger"),
        **counts,
        "tasks_per_second": rate,
        "seconds_left": 0.0 if state == "finished" else seconds_left,
        "started": _iso(run.get("started")),
        "finished": _iso(run.get("finished")),
        "failures": failures,
    }


def _iso(stamp: Any) -> str | None:
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(stamp))) if stamp else None
    except (TypeError, ValueError):
        return None


def _versions(
    project: int, predictor: Predictor, schema: ProjectSchema | None, serving: str, margin: float
) -> list[dict[str, Any]]:
    maskclip = predictor.maskclip_version(schema)
    rows: list[dict[str, Any]] = [
        {
            "name": maskclip,
            "model": "maskclip",
            "active": serving == maskclip,
            "trained": None,
            "annotations": None,
            "heldout_miou": None,
            "gate": None,
        }
    ]
    for version in predictor.registry.versions(str(project)):
        metrics, info = version.metrics, version.info
        gate = {k: metrics.get(k) for k in GATE_FIELDS if k in metrics}
        low = metrics.get("gain_low")
        # The gate promotes when the gain's lower bound clears the margin (maskclip_engine.students.gate).
        gate["decision"] = "passed" if low is not None and low > margin else "refused"
        gate["margin"] = margin
        rows.append(
            {
                "name": version.name,
                "model": "student",
                "active": version.name == serving,
                "trained": info.get("created"),
                "annotations": info.get("annotated"),
                "heldout_miou": metrics.get("held_out_miou"),
                "gate": gate,
            }
        )
    return rows


def _store(predictor: Predictor) -> dict[str, Any]:
    features = predictor.segmenter.features
    lookups = features.from_memory + features.from_store + features.computed
    out: dict[str, Any] = {
        "enabled": features.store is not None,
        "entries": None,
        "bytes": None,
        "from_memory": features.from_memory,
        "from_store": features.from_store,
        "computed": features.computed,
        # The share of this process's lookups that did not run the backbone (memory or store).
        "hit_rate": round((features.from_memory + features.from_store) / lookups, 4) if lookups else None,
    }
    if features.store is not None:
        sizes = [entry.stat().st_size for entry in features.store.entries()]
        out["entries"], out["bytes"] = len(sizes), sum(sizes)
    return out


def _review(model_dir: Path, project: int) -> dict[str, Any] | None:
    folder = latest_review(model_dir, project)
    if folder is None:
        return None
    out: dict[str, Any] = {"url": f"/review/{project}/", "folder": folder.name}
    try:
        document = json.loads((folder / "review.json").read_text())
        rows = document.get("annotations", [])
        out.update(
            created=document.get("created"), annotations=len(rows), flagged=sum(bool(r.get("flagged")) for r in rows)
        )
    except (OSError, ValueError, AttributeError):
        pass  # the page links the review all the same
    return out
