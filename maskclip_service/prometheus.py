"""The backend's metrics, served as Prometheus text on ``/metrics`` through ``prometheus_client``.

Each :class:`Metrics` owns its own ``CollectorRegistry``: two apps in one
process (tests build many) never share or collide on counters.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Summary, generate_latest
from prometheus_client.metrics import MetricWrapperBase

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# name -> (kind, help, label names). Names are what dashboards already query: keep them.
FAMILIES: dict[str, tuple[type[MetricWrapperBase], str, tuple[str, ...]]] = {
    "maskclip_http_requests_total": (Counter, "HTTP requests by route and status.", ("route", "status")),
    "maskclip_tasks_predicted_total": (Counter, "Tasks that got a prediction.", ()),
    "maskclip_task_failures_total": (Counter, "Tasks that got no prediction, by reason.", ("reason",)),
    "maskclip_predict_seconds": (Summary, "Time spent answering /predict.", ()),
    "maskclip_inference_wait_seconds": (Summary, "Time a /predict batch waited for its device.", ()),
    "maskclip_interactive_seconds": (Summary, "Time spent answering an interactive (smart tool) /predict.", ()),
    "maskclip_model_info": (Gauge, "The model serving predictions.", ("version", "device")),
    "maskclip_feature_lookups": (
        Gauge,
        "Images whose backbone output this process took from memory, from the feature store, or computed.",
        ("source",),
    ),
    "maskclip_preannotate_total": (
        Gauge,
        "Tasks a pre-annotation run has to consider, by project and target version.",
        ("project", "version"),
    ),
    "maskclip_preannotate_done": (
        Gauge,
        "Tasks a pre-annotation run has finished (predicted, failed or skipped).",
        ("project", "version"),
    ),
    "maskclip_preannotate_failed": (
        Gauge,
        "Tasks a pre-annotation run left without a prediction because their image failed.",
        ("project", "version"),
    ),
    "maskclip_preannotate_tasks_per_second": (
        Gauge,
        "Throughput of a pre-annotation run.",
        ("project", "version"),
    ),
    "maskclip_preannotate_running": (
        Gauge,
        "1 while a pre-annotation run is live, 0 once it has finished.",
        ("project", "version", "phase"),
    ),
}


class Metrics:
    """Counters, gauges and summaries by name, as the rest of the code calls them; thread-safe."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._families: dict[str, MetricWrapperBase] = {}
        self._lock = threading.Lock()

    def _family(self, name: str) -> MetricWrapperBase:
        with self._lock:
            family = self._families.get(name)
            if family is None:
                if name not in FAMILIES:
                    raise KeyError(f"unknown metric {name!r}; declare it in maskclip_service/prometheus.py FAMILIES")
                kind, text, labels = FAMILIES[name]
                family = self._families[name] = kind(name, text, labels, registry=self.registry)
            return family

    def _child(self, name: str, labels: dict[str, str]) -> MetricWrapperBase:
        family = self._family(name)
        return family.labels(**{k: str(v) for k, v in labels.items()}) if labels else family

    def count(self, name: str, value: float = 1.0, **labels: str) -> None:
        self._child(name, labels).inc(value)

    def set(self, name: str, value: float, **labels: str) -> None:
        self._child(name, labels).set(value)

    def observe(self, name: str, seconds: float) -> None:
        self._family(name).observe(seconds)

    def forget(self, name: str) -> None:
        """Drop every labelled series of a gauge family (before re-reading state that may have ended)."""
        family = self._family(name)
        family.clear()

    def render(self) -> str:
        return generate_latest(self.registry).decode()
