"""A small thread-safe registry that speaks the Prometheus text format on ``/metrics``."""

from __future__ import annotations

import threading
from collections import defaultdict

_HELP = {
    "maskclip_http_requests_total": ("counter", "HTTP requests by route and status."),
    "maskclip_tasks_predicted_total": ("counter", "Tasks that got a prediction."),
    "maskclip_task_failures_total": ("counter", "Tasks that got an empty prediction, by reason."),
    "maskclip_predict_seconds": ("summary", "Time spent answering /predict."),
    "maskclip_model_info": ("gauge", "The model serving predictions."),
}


class Metrics:
    def __init__(self) -> None:
        self._values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
        self._lock = threading.Lock()

    def count(self, name: str, value: float = 1.0, **labels: str) -> None:
        with self._lock:
            self._values[(name, tuple(sorted(labels.items())))] += value

    def set(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self._values[(name, tuple(sorted(labels.items())))] = value

    def observe(self, name: str, seconds: float) -> None:
        with self._lock:
            self._values[(f"{name}_sum", ())] += seconds
            self._values[(f"{name}_count", ())] += 1

    def render(self) -> str:
        with self._lock:
            items = sorted(self._values.items())
        lines, announced = [], set()
        for (name, labels), value in items:
            family = name.removesuffix("_sum").removesuffix("_count")
            if family not in announced and family in _HELP:
                kind, text = _HELP[family]
                lines += [f"# HELP {family} {text}", f"# TYPE {family} {kind}"]
                announced.add(family)
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(f"{name}{{{label_text}}} {value:g}" if label_text else f"{name} {value:g}")
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
