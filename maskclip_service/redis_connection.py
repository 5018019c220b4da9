"""Connections to the queue's Redis, and a quick look at its health for ``/health``."""

from __future__ import annotations

from typing import Any

from redis import Redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from rq import Worker


def connect(redis_url: str, retries: int = 3, patience_s: float = 2.0, timeout: float | None = None) -> Redis:
    """A Redis connection from a URL (``redis://``, ``rediss://`` or ``unix://``).

    Connection errors and timeouts are retried ``retries`` times with
    exponential backoff capped at ``patience_s``, so a Redis restart of a
    second or two is invisible to callers; longer outages raise ``RedisError``.
    """
    retry = Retry(ExponentialBackoff(cap=patience_s, base=0.05), retries)
    return Redis.from_url(
        redis_url,
        retry=retry,
        retry_on_error=[RedisConnectionError, RedisTimeoutError, ConnectionError],
        health_check_interval=30,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )


def queue_health(redis_url: str, queue_name: str, timeout: float = 1.0) -> dict[str, Any]:
    """Whether the queue's Redis answers and how many RQ workers listen to the queue; never raises, answers fast."""
    try:
        connection = connect(redis_url, retries=0, timeout=timeout)
        connection.ping()
        workers = [w for w in Worker.all(connection=connection) if queue_name in w.queue_names()]
        busy = sum(1 for w in workers if w.get_current_job_id())
        return {"redis": "reachable", "workers": len(workers), "busy_workers": busy}
    except (RedisError, OSError) as exc:
        return {"redis": f"unreachable: {exc.__class__.__name__}", "workers": None}
