"""Authenticating with the Label Studio server.

Label Studio accepts two kinds of API keys: legacy tokens (``Authorization:
Token KEY``) and personal access tokens, which are JWT refresh tokens traded at
``/api/token/refresh/`` for short-lived access tokens (``Authorization: Bearer``).
"""

from __future__ import annotations

import threading
import time

import jwt
import requests

from maskclip_service.origins import origin

from .errors import ImageFetchError

_REFRESH_MARGIN_S = 30


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
