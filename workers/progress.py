"""A training job's progress in its RQ job meta, written so that Redis trouble never stops training.

The training loop only updates a dictionary in memory. A background thread
writes it to the job's meta (at most once a second, and a heartbeat every
``HEARTBEAT_S``) and retries with growing pauses when Redis is unreachable,
logging once rather than raising. The same thread checks, every few seconds,
that the job still owns its project's training: a job presumed lost while it
was only cut off from Redis learns that another job took over, and stops.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

from rq import get_current_job
from tqdm import tqdm

from maskclip_service.defaults import HEARTBEAT_S
from maskclip_service.errors import JobSupersededError
from maskclip_service.training_queue import claim, owner

log = logging.getLogger(__name__)

FLUSH_S = 1.0  # meta is written at most this often
OWNER_CHECK_S = 2.0  # how soon a job learns it was replaced


class Progress:
    """Reports a job's progress to the RQ job's meta, the log and a terminal bar; thread-safe, never raises."""

    def __init__(self, project: int, total: int | None = None) -> None:
        self.job = get_current_job()
        self.project = project
        self.meta: dict[str, Any] = {}
        self.superseded: str | None = None
        self._dirty = False
        self._failures = 0
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._stopped = threading.Event()
        self._bar = tqdm(total=total, desc=f"training project {project}", unit="step") if sys.stderr.isatty() else None
        self._thread = None
        if self.job is not None:
            self._thread = threading.Thread(target=self._run, name="job-heartbeat", daemon=True)
            self._thread.start()

    def update(self, force: bool = False, **fields: Any) -> None:
        """Record ``fields``; ``force`` writes them to Redis now (phase changes), else within a second."""
        with self._lock:
            self.meta.update(fields)
            self._dirty = True
        if self._bar is not None and "step" in fields:
            self._bar.total = fields.get("iterations", self._bar.total)
            self._bar.n = fields["step"]
            self._bar.set_postfix(loss=f"{fields.get('loss', 0):.3f}", phase=fields.get("phase"), refresh=True)
        step = fields.get("step")
        if step is not None and (step == 1 or step % 50 == 0 or step == fields.get("iterations")):
            log.info(
                "project %s: step %s/%s loss %.4f (%s)",
                self.project,
                step,
                fields.get("iterations"),
                fields.get("loss", float("nan")),
                fields.get("phase"),
            )
        if force and self.job is not None:
            self._save()

    def training_step(self, fields: dict[str, Any]) -> None:
        """The training loop's callback: record the step, and stop if another job took the project over."""
        self.update(**fields)
        self.raise_if_superseded()

    def check_owner(self) -> None:
        """Raise :class:`JobSupersededError` if another job owns the project (unknown while Redis is away: go on)."""
        if self.job is not None and self.superseded is None:
            if claim(self.job.connection, self.project, self.job.id) is False:
                self.superseded = self._owner()
        self.raise_if_superseded()

    def raise_if_superseded(self) -> None:
        if self.superseded is not None:
            raise JobSupersededError(
                f"project {self.project}'s training was handed to {self.superseded} while this job ran (it was "
                "presumed lost); this job stops without storing or promoting a model."
            )

    def close(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._bar is not None:
            self._bar.close()

    # ------------------------------------------------------------ background
    def _run(self) -> None:
        last_beat = last_check = time.monotonic()
        delay = FLUSH_S
        while not self._stopped.wait(delay):
            now = time.monotonic()
            ok = True
            if self._dirty or now - last_beat >= HEARTBEAT_S:
                ok = self._save()
                last_beat = now if ok else last_beat
            if ok and now - last_check >= OWNER_CHECK_S:
                last_check = now
                if self.superseded is None and claim(self.job.connection, self.project, self.job.id) is False:
                    self.superseded = self._owner()
                    log.warning("project %s: %s took over; this job stops", self.project, self.superseded)
            delay = FLUSH_S if ok else min(HEARTBEAT_S, FLUSH_S * 2 ** min(self._failures, 4))

    def _save(self) -> bool:
        """Write the meta with a fresh heartbeat; False (logged, never raised) when Redis cannot take it."""
        with self._save_lock:
            with self._lock:
                self.meta["heartbeat"] = time.time()
                snapshot = dict(self.meta)
                self._dirty = False
            try:
                self.job.meta.update(snapshot)
                self.job.save_meta()
            except Exception as exc:  # Redis down or restarting: training goes on, the next write catches up
                self._dirty = True
                self._failures += 1
                if self._failures == 1 or self._failures % 20 == 0:
                    log.warning("project %s: progress not saved (%s tries): %s", self.project, self._failures, exc)
                return False
            if self._failures:
                log.info("project %s: progress reaches Redis again after %s failed tries", self.project, self._failures)
                self._failures = 0
            return True

    def _owner(self) -> str:
        try:
            return owner(self.job.connection, self.project) or "no job"
        except Exception:  # noqa: BLE001  (only for the message)
            return "another job"
