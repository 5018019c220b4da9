"""Text embeddings of a project's labels, computed in the background as soon as its config is seen.

Label Studio sends a project's label config to ``/setup`` when the backend is
connected and in a ``PROJECT_UPDATED`` webhook when the labels change; the
first prediction follows seconds later. Warming the text cache then makes
that prediction (and every later process, through the disk cache) skip text
encoding. Warm-ups are bounded: ``max_running`` at a time, ``max_waiting``
more queued, and a config beyond that is refused with :class:`WarmupBusyError`.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

from .errors import WarmupBusyError

if TYPE_CHECKING:
    from maskclip_engine import Segmenter

log = logging.getLogger(__name__)

TEXTS_PER_LOCK = 16  # texts encoded per hold of the device lock, so predictions interleave with long warm-ups
REMEMBERED = 256  # recent configs whose warm-up is not repeated


class TextWarmup:
    """Bounded background warm-ups of label configs' text embeddings; thread-safe."""

    def __init__(
        self,
        segmenter: Segmenter,
        max_running: int = 2,
        max_waiting: int = 16,
        device_lock: AbstractContextManager | None = None,
    ) -> None:
        if max_running < 1 or max_waiting < 0:
            raise ValueError("max_running must be at least 1 and max_waiting at least 0.")
        self.segmenter = segmenter
        self.max_running = max_running
        self.limit = max_running + max_waiting
        self._device_lock = device_lock if device_lock is not None else nullcontext()
        self._pool = ThreadPoolExecutor(max_workers=max_running, thread_name_prefix="text-warmup")
        self._recent: OrderedDict[tuple, Future] = OrderedDict()
        self._pending = 0
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        """Warm-ups running or waiting now."""
        with self._lock:
            return self._pending

    def submit(self, texts: Iterable[str]) -> Future:
        """Start warming ``texts`` (a config's labels and synonyms), or return the warm-up already started for them."""
        key = tuple(dict.fromkeys(texts))  # each text once: the text cache is keyed by text
        with self._lock:
            known = self._recent.get(key)
            if known is not None and not (known.done() and known.exception() is not None):
                self._recent.move_to_end(key)
                return known
            if self._pending >= self.limit:
                raise WarmupBusyError(
                    f"{self._pending} label configs are being prepared already (the limit); retry in a few "
                    "seconds, or raise MASKCLIP_MAX_WARMUPS / MASKCLIP_WARMUP_QUEUE."
                )
            self._pending += 1
            future = self._pool.submit(self._warm, key)
            self._recent[key] = future
            while len(self._recent) > REMEMBERED:
                self._recent.popitem(last=False)
        future.add_done_callback(self._finished)
        return future

    def _finished(self, future: Future) -> None:
        with self._lock:
            self._pending -= 1
        if not future.cancelled() and future.exception() is not None:
            log.error("warming the text cache failed: %s", future.exception())

    def _warm(self, texts: tuple[str, ...]) -> int:
        """Embed every text (into the memory and disk caches); returns how many there were."""
        for start in range(0, len(texts), TEXTS_PER_LOCK):
            with self._device_lock:
                self.segmenter.text.embed(list(texts[start : start + TEXTS_PER_LOCK]))
        return len(texts)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
