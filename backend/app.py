"""The HTTP protocol Label Studio 1.23 speaks to ML backends, on Flask 3.

``create_app()`` builds the model once, at start-up; every request shares it.
"""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any

from flask import Flask, Response, g, jsonify, request
from redis.exceptions import RedisError
from werkzeug.exceptions import HTTPException

from ls_integration.errors import (
    BackendError,
    BadRequestError,
    QueueUnavailableError,
    TooManyTasksError,
    UnsupportedLabelConfigError,
)
from ls_integration.host_pin import HostPin
from ls_integration.ids import is_id
from ls_integration.interactive import context_regions
from ls_integration.label_config import SchemaCache
from ls_integration.metrics import CONTENT_TYPE, Metrics
from ls_integration.preannotation import publish_metrics, start_run
from ls_integration.predictor import Predictor, ProjectLink
from ls_integration.queue import LOST_AFTER_S, connect, count_annotation, enqueue_training, queue_health
from ls_integration.settings import Settings
from maskclip_engine import MaskClipError

log = logging.getLogger(__name__)

OPEN_ROUTES = ("/", "/health")
TRAINING_EVENTS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED", "START_TRAINING")


def create_app(settings: Settings | None = None, predictor: Predictor | None = None) -> Flask:
    """The backend's Flask app; pass ``predictor`` to share an already loaded model."""
    settings = settings or (predictor.settings if predictor is not None else Settings.from_env())
    metrics = predictor.metrics if predictor is not None else Metrics()
    predictor = predictor or Predictor.from_settings(settings, metrics)
    schemas = SchemaCache(settings.max_labels, max_prompts=settings.max_prompts)
    host_pin = HostPin(settings.label_studio_url, settings.model_dir)
    queue = TrainingQueue(settings, predictor)

    app = Flask("maskclip_backend")
    app.config["MASKCLIP_PREDICTOR"] = predictor
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes  # larger bodies are refused before being read
    metrics.set("maskclip_model_info", 1, version=predictor.version, device=str(predictor.segmenter.clip.device))

    @app.before_request
    def _authenticate() -> Response | None:
        g.started = time.perf_counter()
        if request.path in OPEN_ROUTES or not settings.basic_auth_user:
            return None
        try:
            auth = request.authorization
        except (ValueError, UnicodeError):  # a header that is not base64 of UTF-8: no credentials
            auth = None
        # Compared as UTF-8 bytes: compare_digest refuses non-ASCII str, and a password may hold any character.
        if (
            auth is None
            or not hmac.compare_digest((auth.username or "").encode(), settings.basic_auth_user.encode())
            or not hmac.compare_digest((auth.password or "").encode(), (settings.basic_auth_pass or "").encode())
        ):
            return Response(
                '{"error": "authentication required: set the same basic-auth user and password in Label Studio"}',
                401,
                {"WWW-Authenticate": 'Basic realm="maskclip"', "Content-Type": "application/json"},
            )
        return None

    @app.after_request
    def _count(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule else "unknown"
        metrics.count("maskclip_http_requests_total", route=route, status=str(response.status_code))
        return response

    @app.errorhandler(BackendError)
    def _backend_error(exc: BackendError):
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
                "error": f"the request body is over {settings.max_request_bytes:,} bytes; send fewer tasks per "
                "request or raise MASKCLIP_MAX_REQUEST_BYTES."
            }
        ), 413

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        if isinstance(exc, HTTPException):  # werkzeug's own 4xx answers stay what they are
            return jsonify({"error": exc.description}), exc.code
        log.exception("unhandled error on %s", request.path)
        return jsonify({"error": "internal error; the backend log has the details"}), 500

    @app.get("/")
    @app.get("/health")
    def health():
        body = {"status": "UP", "model_class": "MaskCLIP", "model_version": predictor.version}
        if settings.redis_url:  # training's state beside it; model serving is UP either way
            body["queue"] = queue_health(settings.redis_url, settings.queue_name)
        return jsonify(body)

    @app.post("/setup")
    def setup():
        body = _json_body()
        project = _project_id(body.get("project"))
        config = body.get("schema")
        schema = schemas.get(config)
        hostname = host_pin.admit(body.get("hostname"))  # before anything is stored: a foreign host is refused
        predictor.link_project(
            project,
            ProjectLink(hostname=hostname, access_token=body.get("access_token"), label_config=config),
        )
        predictor.warm_text_cache(schema)  # in the background; a config seen before is not warmed again
        return jsonify({"model_version": predictor.project_version(project, schema)})

    @app.post("/predict")
    def predict():
        body = _json_body()
        tasks = body.get("tasks")
        if not isinstance(tasks, list):
            raise BadRequestError("the body needs 'tasks': a list of Label Studio tasks.")
        if len(tasks) > settings.max_tasks:
            raise TooManyTasksError(
                f"{len(tasks)} tasks in one request, over this backend's limit of {settings.max_tasks}; select fewer "
                "tasks in Label Studio or raise MASKCLIP_MAX_TASKS."
            )
        project = _project_id(body.get("project"), required=False)
        config = body.get("label_config")
        if not config and project:
            link = predictor.project_link(project)
            config = link.label_config if link else None
        if not config:
            raise BadRequestError("the body needs 'label_config' (the project's labeling config XML).")
        params = body.get("params") if isinstance(body.get("params"), dict) else {}
        requested = body.get("model_version") or params.get("model_version")
        if context_regions(params.get("context")) is not None:  # a smart tool: Label Studio's interactive call
            results = predictor.predict_context(tasks, schemas.get(config), params["context"], project, requested)
        else:
            results = predictor.predict(tasks, schemas.get(config), project, requested=requested)
        # A task whose image failed has [] (no prediction): Label Studio asks for it again next time.
        served = next((r["model_version"] for r in results if r), None) or predictor.project_version(project, None)
        return jsonify({"results": results, "model_version": served})

    @app.post("/webhook")
    def webhook():
        body = _json_body()
        action = body.get("action")
        if action == "TASKS_CREATED":
            return jsonify(queue.preannotate_new_tasks(body)), 200
        if action == "PROJECT_UPDATED":  # the labels may have changed: embed them before the next prediction asks
            return jsonify(_warm_project_config(body)), 200
        if action not in TRAINING_EVENTS:
            return jsonify({"status": "ignored", "action": action}), 200
        project = body.get("project")
        project_id = _project_id(project.get("id") if isinstance(project, dict) else project)
        if action == "START_TRAINING":
            return jsonify(queue.enqueue(project_id, "start_training")), 200
        if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED") and queue.count_annotation(project_id):
            return jsonify(queue.enqueue(project_id, f"every {settings.train_every} annotations")), 200
        return jsonify({"status": "received", "action": action}), 200

    def _warm_project_config(body: dict[str, Any]) -> dict[str, Any]:
        project = body.get("project")
        config = project.get("label_config") if isinstance(project, dict) else None
        if not isinstance(config, str) or not config.strip():
            return {
                "status": "ignored",
                "action": "PROJECT_UPDATED",
                "reason": "the payload has no project.label_config",
            }
        try:
            schema = schemas.get(config)
        except UnsupportedLabelConfigError as exc:
            return {"status": "ignored", "action": "PROJECT_UPDATED", "reason": str(exc)}
        predictor.warm_text_cache(schema)
        return {"status": "warming", "action": "PROJECT_UPDATED"}

    @app.post("/train")
    def train():
        """Label Studio's older training call (without the webhook feature flag)."""
        body = _json_body()
        return jsonify(queue.enqueue(_project_id(body.get("project")), "start_training")), 200

    @app.route("/versions", methods=["GET", "POST"])
    def versions():
        body = request.get_json(silent=True)
        body = body if isinstance(body, dict) else {}
        project = _project_id(body.get("project") or request.args.get("project"), required=False)
        details = predictor.versions(project)
        return jsonify({"versions": [d["version"] for d in details], "details": details})

    @app.get("/metrics")
    def prometheus():
        queue.publish_preannotation(metrics)
        return Response(metrics.render(), mimetype=CONTENT_TYPE)

    return app


class TrainingQueue:
    """The webhook side of training: enqueue at once, never train on the request path."""

    def __init__(self, settings: Settings, predictor: Predictor) -> None:
        self.settings = settings
        self.predictor = predictor
        self._connection = None

    def connection(self):
        if not self.settings.redis_url:
            raise QueueUnavailableError(
                "training needs a queue: set REDIS_URL, or start the backend with `maskclip-backend serve`, "
                "which runs its own."
            )
        if self._connection is None:
            # A Redis that stops answering must not hold a request past Label Studio's 1 s webhook timeout.
            self._connection = connect(self.settings.redis_url, timeout=2.0)
        return self._connection

    def enqueue(self, project: str, trigger: str) -> dict[str, Any]:
        if not is_id(str(project)):
            raise BadRequestError(f"project {project!r} is not a Label Studio project id.")
        # Workers learn where Label Studio is (and its key) from the project store in the shared model folder,
        # where /setup put it: no credential travels through Redis.
        try:
            job_id, created = enqueue_training(
                self.connection(),
                int(project),
                trigger=trigger,
                queue_name=self.settings.queue_name,
                job_timeout=self.settings.job_timeout,
            )
        except RedisError as exc:
            raise QueueUnavailableError(f"the training queue is unreachable: {exc}") from exc
        return {"status": "queued" if created else "coalesced", "job": job_id, "job_id": job_id}

    def preannotate_new_tasks(self, body: dict[str, Any]) -> dict[str, Any]:
        """TASKS_CREATED: queue pre-annotation of the imported tasks (and answer at once)."""
        if not self.settings.preannotate_on_import:
            return {"status": "ignored", "action": "TASKS_CREATED", "reason": "MASKCLIP_PREANNOTATE_ON_IMPORT is off"}
        project = body.get("project")
        project_id = _project_id(project.get("id") if isinstance(project, dict) else project)
        tasks = body.get("tasks") if isinstance(body.get("tasks"), list) else []
        ids = [t.get("id") if isinstance(t, dict) else t for t in tasks]
        ids = [int(t) for t in ids if is_id(t)]
        if not ids:
            return {"status": "ignored", "action": "TASKS_CREATED", "reason": "no task ids in the payload"}
        try:
            run, status = start_run(
                self.connection(),
                int(project_id),
                task_ids=ids,
                trigger="tasks_created",
                queue_name=self.settings.queue_name,
                lost_after_s=LOST_AFTER_S,
            )
        except RedisError as exc:
            raise QueueUnavailableError(f"the pre-annotation queue is unreachable: {exc}") from exc
        return {"status": status, "run": run, "tasks": len(ids)}

    def publish_preannotation(self, metrics: Metrics) -> None:
        """Pre-annotation progress into ``/metrics`` (a missing or unreachable queue just leaves it out)."""
        if not self.settings.redis_url:
            return
        try:
            publish_metrics(self.connection(), metrics)
        except RedisError as exc:
            log.warning("pre-annotation progress is missing from /metrics: %s", exc)

    def count_annotation(self, project: str) -> bool:
        if self.settings.train_every <= 0 or not is_id(str(project)):
            return False
        try:
            return count_annotation(self.connection(), int(project), self.settings.train_every)
        except RedisError as exc:
            raise QueueUnavailableError(f"the training queue is unreachable: {exc}") from exc


def _json_body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequestError("the request body must be a JSON object (Content-Type: application/json).")
    return body


def _project_id(value: Any, required: bool = True) -> str | None:
    """Label Studio sends projects as ``"<id>.<created timestamp>"``; the id is what matters."""
    if value is None or value == "":
        if required:
            raise BadRequestError("the body needs 'project'.")
        return None
    project = str(value).split(".", 1)[0]
    if not is_id(project):
        raise BadRequestError(f"project {value!r} is not a Label Studio project id.")
    return project
