"""``GET /`` and ``GET /health``: Label Studio checks that the backend is up (and we say how the queue is)."""

from __future__ import annotations

from flask import Blueprint, jsonify

from maskclip_service.redis_connection import queue_health

from ..services import services

bp = Blueprint("health", __name__)


@bp.get("/")
@bp.get("/health")
def health():
    s = services()
    body = {"status": "UP", "model_class": "MaskCLIP", "model_version": s.predictor.base_version}
    if s.settings.redis_url:  # training's state beside it; model serving is UP either way
        body["queue"] = queue_health(s.settings.redis_url, s.settings.queue_name)
    return jsonify(body)
