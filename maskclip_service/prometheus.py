"""The backend's metrics, served as Prometheus text on ``/metrics`` through ``prometheus_client``.

Each :class:`Metrics` owns its own ``CollectorRegistry``: two apps in one
process (tests build many) never share or collide on counters.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Summary, generate_latest
from prometheus_client.core import HistogramMetricFamily
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

# Histograms rebuilt from state kept elsewhere (files every worker writes), set whole at each scrape rather
# than observed one value at a time in this process: name -> (help, label names, bucket upper bounds).
DISTRIBUTIONS: dict[str, tuple[str, tuple[str, ...], tuple[float, ...]]] = {
    "maskclip_annotation_agreement_iou": (
        "Mean IoU of each submitted annotation with the proposal its task held, by model version "
        "(1: kept as proposed, 0: repainted).",
        ("project", "version"),
        (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
    ),
}


class _Distributions:
    """A collector serving the latest snapshot of each of :data:`DISTRIBUTIONS`."""

    def __init__(self) -> None:
        self.series: dict[str, dict[tuple[str, ...], list[float]]] = {}
        self.lock = threading.Lock()

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self.lock:
            snapshot = {name: dict(series) for name, series in self.series.items()}
        for name, series in snapshot.items():
            text, labels, bounds = DISTRIBUTIONS[name]
            family = HistogramMetricFamily(name, text, labels=labels)
            for values, observed in sorted(series.items()):
                counts = [0] * (len(bounds) + 1)
                for value in observed:
                    counts[bisect.bisect_left(bounds, value)] += 1
                cumulative, buckets = 0, []
                for bound, count in zip((*bounds, float("inf")), counts, strict=True):
                    cumulative += count
                    buckets.append((_bound(bound), cumulative))
                family.add_metric(list(values), buckets, sum(observed))
            yield family


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(float(value))


class Metrics:
    """Counters, gauges and summaries by name, as the rest of the code calls them; thread-safe."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._families: dict[str, MetricWrapperBase] = {}
        self._lock = threading.Lock()
        self._distributions = _Distributions()
        self.registry.register(self._distributions)

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

    def set_distribution(self, name: str, series: Mapping[tuple[str, ...], Iterable[float]]) -> None:
        """Replace histogram ``name`` (one of :data:`DISTRIBUTIONS`) by ``series``: label values, in the
        order its label names are declared, to every value observed."""
        if name not in DISTRIBUTIONS:
            raise KeyError(f"unknown distribution {name!r}; declare it in maskclip_service/prometheus.py DISTRIBUTIONS")
        width = len(DISTRIBUTIONS[name][1])
        if any(len(labels) != width for labels in series):
            raise ValueError(f"{name} takes {width} label values per series")
        with self._distributions.lock:
            self._distributions.series[name] = {tuple(map(str, k)): [float(v) for v in vs] for k, vs in series.items()}

    def render(self) -> str:
        return generate_latest(self.registry).decode()
