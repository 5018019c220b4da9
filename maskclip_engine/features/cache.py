"""The in-memory level of the feature cache: recently used images' dense state, bounded in bytes.

It sits in front of the on-disk :class:`~maskclip_engine.features.store.FeatureStore`
(see :mod:`maskclip_engine.features.source`) and also keeps the per-label dense
states smart-tool gestures are answered from. Keys are any hashable value that
says everything the entry depends on.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import numpy as np
import torch


def tensor_bytes(value: Any) -> int:
    """Bytes held by the tensors and arrays of ``value`` (a tensor, array, dataclass, or a collection)."""
    if isinstance(value, torch.Tensor):
        return value.element_size() * value.nelement()
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if hasattr(value, "__dataclass_fields__"):
        return sum(tensor_bytes(getattr(value, name)) for name in value.__dataclass_fields__)
    return 0


class FeatureCache:
    """A thread-safe LRU map from keys to tensors (or dataclasses of them), bounded by ``max_mb`` megabytes.

    ``max_mb=0`` disables it: nothing is stored. An entry larger than the whole
    budget is not stored either. ``get_or_compute`` runs the computation outside
    the lock, so one slow image never blocks lookups of others; two threads
    asking for the same new image at once both compute it (rare, and harmless).
    """

    def __init__(self, max_mb: float, sizeof: Callable[[Any], int] = tensor_bytes) -> None:
        if max_mb < 0:
            raise ValueError(f"the feature cache size must be 0 or more megabytes, got {max_mb}.")
        self.max_bytes = int(max_mb * 1024 * 1024)
        self._sizeof = sizeof
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def bytes_used(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: Hashable, value: Any) -> None:
        size = self._sizeof(value)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, evicted) = self._items.popitem(last=False)
                self._bytes -= evicted

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> tuple[Any, bool]:
        """The cached value and ``True``, or a freshly computed (and stored) one and ``False``."""
        value = self.get(key)
        if value is not None:
            return value, True
        value = compute()
        self.put(key, value)
        return value, False

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0
