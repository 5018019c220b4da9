"""What every route works with, built once per app: settings, the predictor, parsed configs, the host pin, job
triggers and metrics."""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app

from ls_integration.host_pin import HostPin
from ls_integration.label_config import ProjectSchema, SchemaCache
from ls_integration.predictor import Predictor
from maskclip_service.prometheus import Metrics
from maskclip_service.settings import Settings

from .triggers import JobTriggers

EXTENSION = "maskclip"


@dataclass
class Services:
    settings: Settings
    predictor: Predictor
    metrics: Metrics
    schemas: SchemaCache
    host_pin: HostPin
    triggers: JobTriggers

    @classmethod
    def build(cls, settings: Settings, predictor: Predictor) -> Services:
        return cls(
            settings=settings,
            predictor=predictor,
            metrics=predictor.metrics,
            schemas=SchemaCache(settings.max_labels, max_prompts=settings.max_prompts),
            host_pin=HostPin(settings.label_studio_url, settings.model_dir),
            triggers=JobTriggers(settings, predictor.projects),
        )

    def project_schema(self, project: str | None) -> ProjectSchema | None:
        """The project's labeling config as ``/setup`` last recorded it, parsed; ``None`` when unknown."""
        link = self.predictor.project_link(project) if project else None
        if link is None or not link.label_config:
            return None
        try:
            return self.schemas.get(link.label_config)
        except Exception:  # a config this backend cannot predict for: no schema to name versions with
            return None


def services() -> Services:
    """The current app's services (inside a request)."""
    return current_app.extensions[EXTENSION]
