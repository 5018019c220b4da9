"""What a worker process keeps between jobs: the loaded CLIP model, and a feature store per folder.

Loading CLIP takes seconds and gigabytes; a worker loads it once (at start-up
or on its first job) and every later job reuses it, with the feature store the
job's settings name.
"""

from __future__ import annotations

import threading

from maskclip_engine import Segmenter
from maskclip_engine.features.source import FeatureSource
from maskclip_engine.features.store import FeatureStore
from maskclip_service.settings import Settings

_loaded: dict[tuple, Segmenter] = {}
_sources: dict[tuple, FeatureSource] = {}
_lock = threading.Lock()


def shared_segmenter(settings: Settings) -> Segmenter:
    """The process's model for ``settings``, reading and writing their feature store."""
    key = (settings.model, settings.pretrained, settings.device, settings.precision, str(settings.cache_dir))
    store = (str(settings.feature_store_dir), settings.feature_store_gb)
    with _lock:
        segmenter = _loaded.get(key)
        if segmenter is None:
            # Jobs read each image's features once (training keeps them with its images), so the store needs no
            # in-memory level in front of it here.
            segmenter = _loaded[key] = settings.build_segmenter(memory_mb=0)
        source = _sources.get(store)
        if source is None:
            source = _sources[store] = FeatureSource(None, FeatureStore.sized(*_store_args(settings)))
    return Segmenter(segmenter.clip, segmenter.options, segmenter.text, source)


def _store_args(settings: Settings) -> tuple:
    return settings.feature_store_dir, settings.feature_store_gb


def loaded_count() -> int:
    """How many models this process has loaded (tests check it stays at one)."""
    return len(_loaded)
