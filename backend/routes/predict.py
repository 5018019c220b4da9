"""``POST /predict``: proposals for tasks (Retrieve Predictions, a task opened) and smart-tool answers."""

from __future__ import annotations

from flask import Blueprint, jsonify

from ls_integration.errors import BadRequestError, TooManyTasksError
from ls_integration.smart_tools import context_regions

from ..requests_json import json_body, project_id
from ..services import services

bp = Blueprint("predict", __name__)


@bp.post("/predict")
def predict():
    s = services()
    body = json_body()
    tasks = body.get("tasks")
    if not isinstance(tasks, list):
        raise BadRequestError("the body needs 'tasks': a list of Label Studio tasks.")
    if len(tasks) > s.settings.max_tasks:
        raise TooManyTasksError(
            f"{len(tasks)} tasks in one request, over this backend's limit of {s.settings.max_tasks}; select fewer "
            "tasks in Label Studio or raise MASKCLIP_MAX_TASKS."
        )
    project = project_id(body.get("project"), required=False)
    config = body.get("label_config")
    if not config and project:
        link = s.predictor.project_link(project)
        config = link.label_config if link else None
    if not config:
        raise BadRequestError("the body needs 'label_config' (the project's labeling config XML).")
    schema = s.schemas.get(config)
    params = body.get("params") if isinstance(body.get("params"), dict) else {}
    requested = body.get("model_version") or params.get("model_version")
    if context_regions(params.get("context")) is not None:  # a smart tool: Label Studio's interactive call
        results = s.predictor.predict_context(tasks, schema, params["context"], project, requested)
    else:
        results = s.predictor.predict(tasks, schema, project, requested=requested)
    # A task whose image failed has [] (no prediction): Label Studio asks for it again next time.
    served = next((r["model_version"] for r in results if r), None) or s.predictor.project_version(project, schema)
    return jsonify({"results": results, "model_version": served})
