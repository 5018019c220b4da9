"""Every error answers as JSON that says what to do; nothing unexpected leaks more than a pointer to the log."""

from __future__ import annotations

import logging

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from maskclip_engine import MaskClipError
from maskclip_service.errors import ServiceError

log = logging.getLogger(__name__)


def register_error_handlers(app: Flask, max_request_bytes: int) -> None:
    @app.errorhandler(ServiceError)
    def _service_error(exc: ServiceError):
        return jsonify({"error": str(exc)}), exc.status

    @app.errorhandler(MaskClipError)
    def _engine_error(exc: MaskClipError):
        return jsonify({"error": str(exc)}), 400

    @app.errorhandler(404)
    def _not_found(_exc):
        return jsonify({"error": f"no route {request.path}; see GET /health"}), 404

    @app.errorhandler(405)
    def _wrong_method(_exc):
        return jsonify({"error": f"{request.method} is not allowed on {request.path}"}), 405

    @app.errorhandler(413)
    def _too_large(_exc):
        return jsonify(
            {
                "error": f"the request body is over {max_request_bytes:,} bytes; send fewer tasks per "
                "request or raise MASKCLIP_MAX_REQUEST_BYTES."
            }
        ), 413

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        if isinstance(exc, HTTPException):  # werkzeug's own 4xx answers stay what they are
            return jsonify({"error": exc.description}), exc.code
        log.exception("unhandled error on %s", request.path)
        return jsonify({"error": "internal error; the backend log has the details"}), 500
