"""Where a project's trained students live, and which one is active.

Layout under the model directory::

    project-12/
        v1.pt  v1.json      every trained version: checkpoint and its metrics
        v2.pt  v2.json
        active.json         {"version": "student-p12-v2", "file": "v2.pt"}

Every file is written to a temporary name and renamed into place, so a killed
job never leaves a half-written checkpoint behind a version name, and the
active pointer only ever names a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maskclip_engine.atomic import atomic_write
from maskclip_engine.students.checkpoint import StudentCheckpoint

_VERSION_FILE = re.compile(r"^v(\d+)\.json$")
# A student's version name, the one Label Studio stores with its predictions: "student-p<project>-v<number>".
_STUDENT_NAME = re.compile(r"^student-p(?P<project>[A-Za-z0-9_]+)-v(?P<number>[1-9]\d*)$")
_TAKEN = re.compile(r"^\.?v(\d+)\.(pt|reserved)$")  # a stored checkpoint or a number another process reserved


def student_version_name(project: str | int, number: int) -> str:
    """The version name of ``project``'s student number ``number``, e.g. ``student-p12-v3``: written here and
    read back by :func:`parse_student_version`, the one place that knows the format."""
    return f"student-p{project}-v{number}"


def parse_student_version(name: str | None) -> tuple[str, int] | None:
    """``(project, number)`` of a student's version name; None for any other name (MaskCLIP's versions)."""
    match = _STUDENT_NAME.match(name) if isinstance(name, str) else None
    return (match.group("project"), int(match.group("number"))) if match else None


def is_student_version(name: str | None) -> bool:
    """Whether ``name`` is a student's version name (:func:`student_version_name`)."""
    return parse_student_version(name) is not None


@dataclass(frozen=True)
class StudentVersion:
    project: str
    number: int
    name: str  # e.g. "student-p12-v3"
    checkpoint: Path
    metrics: dict[str, Any]
    info: dict[str, Any]
    active: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.name, "active": self.active, "metrics": self.metrics, **self.info}


def write_atomic(path: Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


class ModelRegistry:
    """Per-project student versions under ``model_dir``; safe for several processes reading and writing at once.

    A version number is reserved by creating ``.v<N>.reserved`` exclusively
    (``O_EXCL`` works across processes and on shared folders), so two jobs
    that store versions at the same moment never write the same file.
    Choosing which version is active across processes is the caller's lock.
    """

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        self._lock = threading.Lock()

    def folder(self, project: str | int) -> Path:
        return self.model_dir / f"project-{project}"

    @staticmethod
    def version_name(project: str | int, number: int) -> str:
        return student_version_name(project, number)

    def versions(self, project: str | int) -> list[StudentVersion]:
        folder = self.folder(project)
        if not folder.is_dir():
            return []
        active = self.active_name(project)
        found = []
        for entry in sorted(folder.iterdir()):
            match = _VERSION_FILE.match(entry.name)
            checkpoint = folder / f"v{match.group(1)}.pt" if match else None
            if match is None or not checkpoint.is_file():
                continue
            try:
                meta = json.loads(entry.read_text())
            except (OSError, ValueError):
                continue
            number = int(match.group(1))
            name = self.version_name(project, number)
            found.append(
                StudentVersion(
                    str(project),
                    number,
                    name,
                    checkpoint,
                    meta.get("metrics", {}),
                    meta.get("info", {}),
                    active=name == active,
                )
            )
        return sorted(found, key=lambda v: v.number)

    def all_versions(self) -> list[dict[str, Any]]:
        """Every project's versions, as dictionaries with their project."""
        if not self.model_dir.is_dir():
            return []
        out = []
        for folder in sorted(self.model_dir.glob("project-*")):
            project = folder.name.removeprefix("project-")
            out += [{**v.to_dict(), "project": project} for v in self.versions(project)]
        return out

    def add(self, project: str | int, checkpoint: StudentCheckpoint) -> StudentVersion:
        """Store a new version (not yet active): checkpoint first, then its metrics file."""
        with self._lock:
            folder = self.folder(project)
            number, reservation = self._reserve(folder, [v.number for v in self.versions(project)])
            name = self.version_name(project, number)
            checkpoint.info = {
                **checkpoint.info,
                "version": name,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            path = folder / f"v{number}.pt"
            try:
                checkpoint.save(path)
                meta = {"metrics": checkpoint.metrics, "info": checkpoint.info}
                write_atomic(folder / f"v{number}.json", json.dumps(meta, indent=2).encode())
            finally:
                reservation.unlink(missing_ok=True)  # the .pt holds the number now (or nothing was stored)
        return StudentVersion(str(project), number, name, path, checkpoint.metrics, checkpoint.info)

    @staticmethod
    def _reserve(folder: Path, existing: list[int]) -> tuple[int, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        taken = [int(m.group(1)) for p in folder.iterdir() if (m := _TAKEN.match(p.name))]
        number = max(existing + taken, default=0) + 1
        while True:
            reservation = folder / f".v{number}.reserved"
            try:
                os.close(os.open(reservation, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            except FileExistsError:
                number += 1
                continue
            if (folder / f"v{number}.pt").exists():  # stored by a process that finished between list and create
                reservation.unlink(missing_ok=True)
                number += 1
                continue
            return number, reservation

    def activate(self, version: StudentVersion) -> None:
        pointer = {"version": version.name, "file": version.checkpoint.name}
        write_atomic(self.folder(version.project) / "active.json", json.dumps(pointer).encode())

    def active_name(self, project: str | int) -> str | None:
        try:
            pointer = json.loads((self.folder(project) / "active.json").read_text())
        except (OSError, ValueError):
            return None
        return pointer.get("version") if isinstance(pointer, dict) else None

    def active(self, project: str | int) -> StudentVersion | None:
        name = self.active_name(project)
        return next((v for v in self.versions(project) if v.name == name), None) if name else None

    def find(self, project: str | int, name: str) -> StudentVersion | None:
        return next((v for v in self.versions(project) if v.name == name), None)
