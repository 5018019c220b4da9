"""What a worker process keeps between jobs: the loaded CLIP model.

Loading CLIP takes seconds and gigabytes; a worker loads it once (at start-up
or on its first job) and every later job reuses it.
"""

from __future__ import annotations

import threading

from ls_integration.settings import Settings
from maskclip_engine import Segmenter

_loaded: dict[tuple, Segmenter] = {}
_lock = threading.Lock()


def shared_segmenter(settings: Settings) -> Segmenter:
    key = (settings.model, settings.pretrained, settings.device, settings.precision, str(settings.cache_dir))
    with _lock:
        segmenter = _loaded.get(key)
        if segmenter is None:
            segmenter = _loaded[key] = settings.build_segmenter()
        return segmenter


def loaded_count() -> int:
    """How many models this process has loaded (tests check it stays at one)."""
    return len(_loaded)
