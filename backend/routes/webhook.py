"""``POST /webhook``: Label Studio's events. Each answer comes at once (its timeout is one second); the work
they start is queued (:mod:`backend.triggers`)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from ls_integration.errors import UnsupportedLabelConfigError
from ls_integration.project_links import ProjectLink

from ..requests_json import json_body, payload_project
from ..services import services

bp = Blueprint("webhook", __name__)

TRAINING_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED", "START_TRAINING")


@bp.post("/webhook")
def webhook():
    s = services()
    body = json_body()
    action = body.get("action")
    if action == "TASKS_CREATED":
        return jsonify(s.triggers.new_tasks(payload_project(body), body))
    if action == "PROJECT_UPDATED":
        return jsonify(project_updated(body))
    if action not in TRAINING_EVENTS:
        return jsonify({"status": "ignored", "action": action})
    project = payload_project(body)
    if action == "START_TRAINING":
        return jsonify(s.triggers.train(project, "start_training"))
    if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
        # Queued before training is counted, so a training trigger's answer carries it too.
        agreement = s.triggers.compare_annotation(project, body)
        if s.triggers.annotation_counted(project):
            return jsonify(
                {**s.triggers.train(project, f"every {s.settings.train_every} annotations"), "agreement": agreement}
            )
        return jsonify({"status": "received", "action": action, "agreement": agreement})
    return jsonify({"status": "received", "action": action})


def project_updated(body: dict[str, Any]) -> dict[str, Any]:
    """The labels may have changed: embed them before the next prediction asks, keep the project's link up to
    date, and re-propose every unannotated task when the label set is new."""
    s = services()
    project = body.get("project")
    config = project.get("label_config") if isinstance(project, dict) else None
    if not isinstance(config, str) or not config.strip():
        return {"status": "ignored", "action": "PROJECT_UPDATED", "reason": "the payload has no project.label_config"}
    try:
        schema = s.schemas.get(config)
    except UnsupportedLabelConfigError as exc:
        return {"status": "ignored", "action": "PROJECT_UPDATED", "reason": str(exc)}
    s.predictor.warm_text_cache(schema)
    project_id = payload_project(body)
    link = s.predictor.project_link(project_id)
    if link is not None and link.label_config != config:
        s.predictor.link_project(project_id, ProjectLink(link.hostname, link.access_token, config))
    answer: dict[str, Any] = {"status": "warming", "action": "PROJECT_UPDATED"}
    reproposed = s.triggers.labels_seen(project_id, schema, s.predictor.project_version(project_id, schema))
    if reproposed is not None:
        answer["labels_changed"] = reproposed
    return answer
