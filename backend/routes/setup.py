"""``POST /setup``: Label Studio connects a project (its config, host and key) and asks for the model version."""

from __future__ import annotations

from flask import Blueprint, jsonify

from ls_integration.project_links import ProjectLink

from ..requests_json import json_body, project_id
from ..services import services

bp = Blueprint("setup", __name__)


@bp.post("/setup")
def setup():
    s = services()
    body = json_body()
    project = project_id(body.get("project"))
    config = body.get("schema")
    schema = s.schemas.get(config)
    hostname = s.host_pin.admit(body.get("hostname"))  # before anything is stored: a foreign host is refused
    link = ProjectLink(hostname=hostname, access_token=body.get("access_token"), label_config=config)
    s.predictor.link_project(project, link)
    s.predictor.warm_text_cache(schema)  # in the background; a config seen before is not warmed again
    version = s.predictor.project_version(project, schema)
    s.triggers.labels_seen(project, schema, version)  # a changed label set is re-proposed everywhere
    return jsonify({"model_version": version})
