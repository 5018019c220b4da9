"""Talking to the Label Studio server: where it is and how to authenticate.

Label Studio accepts two kinds of API keys: legacy tokens (``Authorization:
Token KEY``) and personal access tokens, which are JWT refresh tokens traded at
``/api/token/refresh/`` for short-lived access tokens (``Authorization: Bearer``).
"""

from __future__ import annotations

import threading
import time
from urllib.parse import urlsplit

import jwt
import requests

from .errors import ImageFetchError

_REFRESH_MARGIN_S = 30


def origin(url: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of a URL, with the default port filled in."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, (parts.hostname or "").lower(), port


def allowed_origin(entry: str) -> tuple[str | None, str, int | None]:
    """One ``MASKCLIP_ALLOWED_HOSTS`` entry as ``(scheme or None, host, port or None)``.

    ``https://cdn.example.com`` allows that scheme on its default port (or the
    port given); ``cdn.example.com:8443`` allows http and https on that port;
    a bare ``cdn.example.com`` allows http on 80 and https on 443 only.
    """
    text = entry.strip().lower().rstrip("/")
    if "://" in text:
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query:
            raise ValueError(f"{entry!r}: use scheme://host[:port] with http or https and nothing after the port")
        scheme, host, port = origin(text)
        return scheme, host, port
    parts = urlsplit(f"//{text}")
    if not parts.hostname or parts.path or parts.username:
        raise ValueError(f"{entry!r}: use host, host:port or scheme://host[:port]")
    return None, parts.hostname, parts.port


def host_allowed(url: str, entries: tuple[str, ...]) -> bool:
    """Whether ``url``'s scheme, host and port match one of the ``MASKCLIP_ALLOWED_HOSTS`` entries."""
    scheme, host, port = origin(url)
    for entry in entries:
        try:
            want_scheme, want_host, want_port = allowed_origin(entry)
        except ValueError:
            continue  # Settings.validate refuses these at start-up
        if want_host != host or (want_scheme is not None and want_scheme != scheme):
            continue
        if want_port is None:  # a bare host name: default ports only
            if (scheme, port) in (("http", 80), ("https", 443)):
                return True
        elif port == want_port:
            return True
    return False


class LabelStudioAuth:
    """Authorization headers for one Label Studio server and API key; thread-safe."""

    def __init__(self, url: str, api_key: str | None, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self._api_key = api_key
        self._timeout = timeout
        self._access: str | None = None
        self._access_expires = 0.0
        self._lock = threading.Lock()
        claims = _jwt_claims(api_key) if api_key else None
        self.personal_token = bool(claims and claims.get("token_type") == "refresh")

    def __repr__(self) -> str:  # never show the key
        return f"LabelStudioAuth({self.url!r}, {'personal access token' if self.personal_token else 'legacy token'})"

    def headers(self) -> dict[str, str]:
        if not self._api_key:
            return {}
        if not self.personal_token:
            return {"Authorization": f"Token {self._api_key}"}
        with self._lock:
            if self._access is None or time.time() > self._access_expires - _REFRESH_MARGIN_S:
                self._refresh()
            return {"Authorization": f"Bearer {self._access}"}

    def _refresh(self) -> None:
        try:
            response = requests.post(
                f"{self.url}/api/token/refresh/", json={"refresh": self._api_key}, timeout=self._timeout
            )
        except requests.RequestException as exc:
            raise ImageFetchError(
                f"could not reach Label Studio at {self.url} to refresh the API token: {exc}"
            ) from exc
        if response.status_code != 200:
            raise ImageFetchError(
                f"Label Studio refused the personal access token (HTTP {response.status_code}); "
                "create a new one in Account & Settings and update LABEL_STUDIO_API_KEY."
            )
        access = response.json().get("access", "")
        claims = _jwt_claims(access) or {}
        self._access = access
        self._access_expires = float(claims.get("exp", time.time() + 60))

    def same_origin(self, url: str) -> bool:
        return origin(url) == origin(self.url)


def _jwt_claims(token: str) -> dict | None:
    try:
        return jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return None
