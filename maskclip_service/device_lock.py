"""One model call at a time per device, and torch's thread count set once per process.

Request threads that each run the model at once do not finish sooner: on a
CPU they split the same cores between them (each asking torch for all of
them), and on a GPU they compete for its memory. So every model call in a
process takes its device's lock; concurrent requests queue and each runs at
full speed. Fetching images and encoding masks stay outside the lock.
"""

from __future__ import annotations

import logging
import threading

import torch

log = logging.getLogger(__name__)

_locks: dict[str, threading.Lock] = {}
_guard = threading.Lock()
_threads_set: int | None = None


def device_lock(device: object) -> threading.Lock:
    """The lock that serialises model calls on ``device`` (shared by every Predictor in the process)."""
    key = str(device)
    with _guard:
        lock = _locks.get(key)
        if lock is None:
            lock = _locks[key] = threading.Lock()
        return lock


def set_torch_threads(count: int) -> None:
    """Set torch's intra-op thread count once per process; 0 keeps torch's default.

    A later different request is ignored with a warning: torch allows
    changing it, but two parts of one process fighting over it is a bug.
    """
    global _threads_set
    if count <= 0:
        return
    with _guard:
        if _threads_set is None:
            torch.set_num_threads(count)
            _threads_set = count
            log.info("torch uses %d intra-op threads", count)
        elif _threads_set != count:
            log.warning("torch already uses %d threads; ignoring a request for %d", _threads_set, count)
