"""Per-project links shared by every backend replica and worker: what ``/setup`` said about a project.

Label Studio calls ``/setup`` on whichever replica its load balancer picks;
the ``/predict`` that follows may land on another one, and a worker on another
host may need the project's Label Studio address to write predictions. So the
link lives in the shared model folder, beside the project's students::

    project-12/
        link.json     {"hostname": ..., "access_token": ..., "label_config": ..., "updated": ...}
        labels.json   {"digest": ...}: the label set the project's proposals were last made for

The file is written atomically (a reader sees the old or the new link, never
half of one) and readable by its owner only, since it holds an API token.
Reads are cached per process and revalidated by the file's modification time,
so a ``/predict`` costs one ``stat``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from maskclip_engine.atomic import atomic_write

from .ids import is_id

log = logging.getLogger(__name__)

LINK_FILE = "link.json"
LABELS_FILE = "labels.json"


@dataclass(frozen=True)
class ProjectLink:
    """What ``/setup`` told us about a project: where its Label Studio is, and its config."""

    hostname: str | None = None
    access_token: str | None = field(default=None, repr=False)
    label_config: str | None = None


class ProjectLinks:
    """Project links under ``model_dir``; safe for many threads, processes and hosts sharing the folder."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        self._cache: dict[str, tuple[int, ProjectLink]] = {}
        self._lock = threading.Lock()

    def path(self, project: str | int) -> Path:
        project = str(project)
        if not is_id(project):
            raise ValueError(f"project {project!r} is not a Label Studio project id.")
        return self.model_dir / f"project-{project}" / LINK_FILE

    def save(self, project: str | int, link: ProjectLink) -> None:
        """Record ``link``; a link equal to the stored one is not rewritten (``/setup`` comes often)."""
        if self.load(project) == link:
            return
        path = self.path(project)
        data = json.dumps({**asdict(link), "updated": time.time()}, sort_keys=True).encode()

        def write(handle) -> None:
            os.fchmod(handle.fileno(), 0o600)  # it holds the project's API token
            handle.write(data)

        atomic_write(path, write)
        with self._lock:
            self._cache.pop(str(project), None)

    def load(self, project: str | int) -> ProjectLink | None:
        """The stored link, or None when no replica has seen ``/setup`` for ``project``."""
        path = self.path(project)
        try:
            stamp = path.stat().st_mtime_ns
        except FileNotFoundError:
            return None
        key = str(project)
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable project link %s: %s", path, exc)
            return None
        link = ProjectLink(
            hostname=raw.get("hostname"), access_token=raw.get("access_token"), label_config=raw.get("label_config")
        )
        with self._lock:
            self._cache[key] = (stamp, link)
        return link

    def projects(self) -> list[str]:
        """Every project some replica has seen ``/setup`` for."""
        if not self.model_dir.is_dir():
            return []
        found = (p.parent.name.removeprefix("project-") for p in self.model_dir.glob(f"project-*/{LINK_FILE}"))
        return sorted((p for p in found if is_id(p)), key=int)

    def swap_labels(self, project: str | int, digest: str) -> str | None:
        """Record that proposals are now made for the label set ``digest``; returns the one recorded before.

        Two replicas swapping at once may both see the old digest; whatever
        they trigger on a change (a pre-annotation run) coalesces.
        """
        path = self.path(project).with_name(LABELS_FILE)
        try:
            previous = json.loads(path.read_text()).get("digest")
        except (OSError, ValueError, AttributeError):
            previous = None
        if previous != digest:
            atomic_write(path, lambda handle: handle.write(json.dumps({"digest": digest}).encode()))
        return previous if isinstance(previous, str) else None
