"""``GET /projects/<id>/``: what the backend does for a project and how much annotators change its proposals, as a
page; ``GET /projects/<id>/status``: the same data as JSON (documented in docs/project-page.md)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, redirect

from ls_integration.ids import is_id

from ..project_page_html import project_page
from ..project_status import UnknownProjectError, project_status
from ..services import services

bp = Blueprint("project_page", __name__)


def _status(project: str):
    """The status dict, or the 404 answer for an id that is not one or a project nothing here knows."""
    if not is_id(project):
        return None, (jsonify({"error": f"{project!r} is not a Label Studio project id"}), 404)
    s = services()
    # An unreachable Redis is met inside project_status: the page says runs are missing and shows the rest.
    connection = s.triggers.connection() if s.settings.redis_url else None
    try:
        status = project_status(int(project), s.settings, s.predictor, s.schemas, connection)
    except UnknownProjectError as exc:
        return None, (jsonify({"error": str(exc), "project": int(project)}), 404)
    return status, None


@bp.get("/projects/<project>")
def page_without_slash(project: str):
    return redirect(f"{project}/", code=308)  # the page's relative links (status, the review) need the slash


@bp.get("/projects/<project>/")
def page(project: str):
    status, refused = _status(project)
    if refused is not None:
        return refused
    return Response(project_page(status), mimetype="text/html")


@bp.get("/projects/<project>/status")
def status_json(project: str):
    status, refused = _status(project)
    return refused if refused is not None else jsonify(status)
