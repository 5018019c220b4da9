"""``POST /train`` (Label Studio's older training call) and ``GET|POST /versions`` (the models it may pick)."""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from ..requests_json import json_body, project_id
from ..services import services

bp = Blueprint("training", __name__)


@bp.post("/train")
def train():
    """Label Studio's older training call (without the webhook feature flag)."""
    return jsonify(services().triggers.train(project_id(json_body().get("project")), "start_training"))


@bp.route("/versions", methods=["GET", "POST"])
def versions():
    s = services()
    body = request.get_json(silent=True)
    body = body if isinstance(body, dict) else {}
    project = project_id(body.get("project") or request.args.get("project"), required=False)
    known = [project] if project else s.predictor.projects.projects()
    schemas = {p: schema for p in known if (schema := s.project_schema(p)) is not None}
    details = s.predictor.versions(project, schemas)
    return jsonify({"versions": [d["version"] for d in details], "details": details})
