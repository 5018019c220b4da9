"""HTTP sessions that ride out transient failures: urllib3's retry machinery on a requests Session.

Connection errors and 429/500/502/503/504 answers to GET and HEAD are tried
again with exponential backoff (0 s, then 0.5 s, 1 s, 2 s ... capped at
``backoff_max``). A ``Retry-After`` header is honoured up to
``RETRY_AFTER_MAX_S``, so a server cannot park a fetch for hours. The time one
call can take is bounded: ``retries + 1`` attempts, each within the caller's
timeout, plus the pauses. Redirects are not followed here: callers see each
3xx and check where it points.
"""

from __future__ import annotations

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
RETRY_AFTER_MAX_S = 10


def retry_policy(retries: int, backoff: float = 0.25, backoff_max: float = 4.0) -> Retry:
    return Retry(
        total=retries,
        connect=retries,
        read=retries,
        status=retries,
        other=0,
        redirect=False,  # never followed by urllib3: the caller re-checks every hop
        allowed_methods=frozenset({"GET", "HEAD"}),
        status_forcelist=RETRY_STATUSES,
        backoff_factor=backoff,
        backoff_max=backoff_max,
        raise_on_status=False,  # the last answer comes back, so the caller can say "HTTP 503"
        respect_retry_after_header=True,
        retry_after_max=RETRY_AFTER_MAX_S,
    )


def retrying_session(retries: int, trust_env: bool = True) -> requests.Session:
    """A Session whose GETs retry transient failures ``retries`` times (0: no retries)."""
    session = requests.Session()
    session.trust_env = trust_env
    adapter = HTTPAdapter(max_retries=retry_policy(retries))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
