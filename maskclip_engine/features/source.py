"""Where a segmenter gets an image's features: memory, then the on-disk store, then the backbone.

The in-memory :class:`~maskclip_engine.features.cache.FeatureCache` is the
level in front of the :class:`~maskclip_engine.features.store.FeatureStore`;
what the backbone computes goes into both. Counters say where answers came
from (tests and benchmarks read them).
"""

from __future__ import annotations

import threading

import torch

from maskclip_engine.features.cache import FeatureCache
from maskclip_engine.features.image_features import FeatureKey, ImageFeatures
from maskclip_engine.features.store import FeatureStore


class FeatureSource:
    """Thread-safe lookup of :class:`ImageFeatures` by :class:`FeatureKey`; either level may be absent."""

    def __init__(self, memory: FeatureCache | None = None, store: FeatureStore | None = None) -> None:
        self.memory = memory if memory is not None and memory.enabled else None
        self.store = store if store is not None and store.enabled else None
        self._lock = threading.Lock()
        self.from_memory = self.from_store = self.computed = 0

    @property
    def enabled(self) -> bool:
        return self.memory is not None or self.store is not None

    def get(self, key: FeatureKey, device: torch.device | str) -> ImageFeatures | None:
        if self.memory is not None and (found := self.memory.get(key)) is not None:
            self._count("from_memory")
            return found
        if self.store is not None and (found := self.store.get(key, device)) is not None:
            self._count("from_store")
            if self.memory is not None:
                self.memory.put(key, found)
            return found
        return None

    def put(self, key: FeatureKey, value: ImageFeatures) -> ImageFeatures:
        """Keep freshly computed features; returns them as every later lookup will see them.

        With a store, that is as the store rounds them
        (:mod:`~maskclip_engine.features.compact`), so an image's first answer
        equals every later one, in this process and in any other.
        """
        self._count("computed")
        if self.store is not None:
            value = self.store.put(key, value)
        if self.memory is not None:
            self.memory.put(key, value)
        return value

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)
