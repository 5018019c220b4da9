"""``GET /review/<project>``: the project's latest annotation review as a page with pictures (and its files)."""

from __future__ import annotations

from flask import Blueprint, abort, send_from_directory

from ls_integration.ids import is_id
from maskclip_engine.review.report import latest_review

from ..services import services

bp = Blueprint("review", __name__)


@bp.get("/review/<project>/")  # /review/<project> redirects here, so the page's relative picture paths resolve
@bp.get("/review/<project>/<path:name>")
def review(project: str, name: str = "index.html"):
    if not is_id(project):
        abort(404)
    folder = latest_review(services().settings.model_dir, project)
    if folder is None:
        return {
            "error": f"project {project} has no review yet: run `maskclip review --project {project}` or train it "
            "(every training job ends with a review)."
        }, 404
    return send_from_directory(folder, name)  # refuses paths that leave the folder
