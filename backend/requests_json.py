"""Reading what Label Studio sends: JSON bodies and project ids."""

from __future__ import annotations

from typing import Any

from flask import request

from ls_integration.errors import BadRequestError
from ls_integration.ids import is_id


def json_body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequestError("the request body must be a JSON object (Content-Type: application/json).")
    return body


def project_id(value: Any, required: bool = True) -> str | None:
    """Label Studio sends projects as ``"<id>.<created timestamp>"``; the id is what matters."""
    if value is None or value == "":
        if required:
            raise BadRequestError("the body needs 'project'.")
        return None
    project = str(value).split(".", 1)[0]
    if not is_id(project):
        raise BadRequestError(f"project {value!r} is not a Label Studio project id.")
    return project


def payload_project(body: dict[str, Any]) -> str | None:
    """A webhook's project id (``project`` is an object with ``id``, or the id itself)."""
    project = body.get("project")
    return project_id(project.get("id") if isinstance(project, dict) else project)
