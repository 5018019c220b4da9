"""``GET /metrics``: Prometheus text (requests, predictions, failures, pre-annotation progress)."""

from __future__ import annotations

from flask import Blueprint, Response

from ls_integration.agreement import publish_agreement
from maskclip_service.prometheus import CONTENT_TYPE

from ..services import services

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def prometheus():
    s = services()
    s.triggers.publish_preannotation(s.metrics)
    publish_agreement(s.settings.model_dir, s.metrics)
    features = s.predictor.segmenter.features
    for source, count in (
        ("memory", features.from_memory),
        ("store", features.from_store),
        ("computed", features.computed),
    ):
        s.metrics.set("maskclip_feature_lookups", count, source=source)
    return Response(s.metrics.render(), mimetype=CONTENT_TYPE)
