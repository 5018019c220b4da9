"""The HTTP protocol Label Studio 1.23 speaks to ML backends, on Flask 3.

``create_app()`` builds the model once, at start-up; every request shares it.
The routes are in :mod:`backend.routes`, one module each.
"""

from __future__ import annotations

import time

from flask import Flask, Response, g, request

from ls_integration.predictor import Predictor
from maskclip_service.prometheus import Metrics
from maskclip_service.settings import Settings

from .auth import refused
from .errors import register_error_handlers
from .routes import BLUEPRINTS
from .services import EXTENSION, Services


def create_app(settings: Settings | None = None, predictor: Predictor | None = None) -> Flask:
    """The backend's Flask app; pass ``predictor`` to share an already loaded model."""
    settings = settings or (predictor.settings if predictor is not None else Settings.from_env())
    predictor = predictor or Predictor.from_settings(settings, Metrics())
    services = Services.build(settings, predictor)

    app = Flask("maskclip_backend")
    app.extensions[EXTENSION] = services
    app.config["MASKCLIP_PREDICTOR"] = predictor
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes  # larger bodies are refused before being read
    device = str(predictor.segmenter.clip.device)
    services.metrics.set("maskclip_model_info", 1, version=predictor.base_version, device=device)

    @app.before_request
    def _authenticate() -> Response | None:
        g.started = time.perf_counter()
        return refused(settings)

    @app.after_request
    def _count(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule else "unknown"
        services.metrics.count("maskclip_http_requests_total", route=route, status=str(response.status_code))
        return response

    register_error_handlers(app, settings.max_request_bytes)
    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint)
    return app
