"""What webhooks and ``/setup`` queue: training, pre-annotation of new tasks, and re-proposals after a label
change. Everything here only enqueues and answers at once; the work runs on the workers."""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import RedisError

from ls_integration.errors import BadRequestError
from ls_integration.ids import is_id
from ls_integration.label_config import ProjectSchema
from ls_integration.project_links import ProjectLinks
from maskclip_service.agreement_queue import enqueue_comparison
from maskclip_service.errors import QueueUnavailableError
from maskclip_service.preannotation_runs import publish_metrics, queue_preannotation
from maskclip_service.prometheus import Metrics
from maskclip_service.redis_connection import connect
from maskclip_service.settings import Settings
from maskclip_service.training_queue import count_annotation, enqueue_training

log = logging.getLogger(__name__)


class JobTriggers:
    """The backend's side of the queue: enqueue at once, never work on the request path."""

    def __init__(self, settings: Settings, links: ProjectLinks) -> None:
        self.settings = settings
        self.links = links
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

    def train(self, project: str, trigger: str) -> dict[str, Any]:
        """Queue training (or join the project's live job)."""
        if not is_id(str(project)):
            raise BadRequestError(f"project {project!r} is not a Label Studio project id.")
        # Workers learn where Label Studio is (and its key) from the project links in the shared model folder,
        # where /setup put them: no credential travels through Redis.
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

    def preannotate(self, project: str, trigger: str, **run: Any) -> dict[str, Any]:
        try:
            run_id, status = queue_preannotation(self.connection(), self.settings, int(project), trigger=trigger, **run)
        except RedisError as exc:
            raise QueueUnavailableError(f"the pre-annotation queue is unreachable: {exc}") from exc
        return {"status": status, "run": run_id}

    def new_tasks(self, project: str, body: dict[str, Any]) -> dict[str, Any]:
        """TASKS_CREATED: queue pre-annotation of the imported tasks."""
        if not self.settings.preannotate_on_import:
            return {"status": "ignored", "action": "TASKS_CREATED", "reason": "MASKCLIP_PREANNOTATE_ON_IMPORT is off"}
        tasks = body.get("tasks") if isinstance(body.get("tasks"), list) else []
        ids = [int(t) for t in (t.get("id") if isinstance(t, dict) else t for t in tasks) if is_id(t)]
        if not ids:
            return {"status": "ignored", "action": "TASKS_CREATED", "reason": "no task ids in the payload"}
        return {**self.preannotate(project, "tasks_created", task_ids=ids), "tasks": len(ids)}

    def labels_seen(self, project: str, schema: ProjectSchema, version: str) -> dict[str, Any] | None:
        """Note the label set a config asks for; when it differs from the one proposals were made for, queue
        ``version``'s proposals (the model that serves the new labels) for every unannotated task and switch
        the project to them. ``None``: nothing changed."""
        previous = self.links.swap_labels(project, schema.labels_digest)
        if previous is None or previous == schema.labels_digest:
            return None
        if not self.settings.preannotate_on_label_change or not self.settings.redis_url:
            log.info("project %s: labels changed; re-proposing is off or there is no queue", project)
            return {"status": "labels changed", "queued": False}
        log.info("project %s: labels changed (%s -> %s): re-proposing", project, previous, schema.labels_digest)
        return self.preannotate(project, "labels_changed", version=version, set_project_version=True)

    def annotation_counted(self, project: str) -> bool:
        """Count a new or updated annotation; True when it is time to train (every ``MASKCLIP_TRAIN_EVERY``)."""
        if self.settings.train_every <= 0 or not is_id(str(project)):
            return False
        try:
            return count_annotation(self.connection(), int(project), self.settings.train_every)
        except RedisError as exc:
            raise QueueUnavailableError(f"the training queue is unreachable: {exc}") from exc

    def compare_annotation(self, project: str, body: dict[str, Any]) -> dict[str, Any]:
        """ANNOTATION_CREATED / ANNOTATION_UPDATED: queue the comparison of the annotation with its task's
        proposal. Never fails the webhook: without a queue the answer says why nothing was queued."""
        annotation = body.get("annotation")
        ident = annotation.get("id") if isinstance(annotation, dict) else None
        if not is_id(str(project)) or not is_id(ident):
            return {"status": "ignored", "reason": "the payload names no project and annotation id"}
        if not self.settings.redis_url:
            return {"status": "ignored", "reason": "no queue (REDIS_URL): run `maskclip agreement --project ID`"}
        try:
            job = enqueue_comparison(self.connection(), int(project), int(ident), self.settings.queue_name)
        except RedisError as exc:
            log.warning("project %s: annotation %s is not compared: %s", project, ident, exc)
            return {"status": "not queued", "reason": f"the queue is unreachable: {exc}"}
        return {"status": "queued", "job": job}

    def publish_preannotation(self, metrics: Metrics) -> None:
        """Pre-annotation progress into ``/metrics`` (a missing or unreachable queue just leaves it out)."""
        if not self.settings.redis_url:
            return
        try:
            publish_metrics(self.connection(), metrics)
        except RedisError as exc:
            log.warning("pre-annotation progress is missing from /metrics: %s", exc)
