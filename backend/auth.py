"""Optional HTTP basic auth on every route but the health check (``BASIC_AUTH_USER`` / ``BASIC_AUTH_PASS``)."""

from __future__ import annotations

import hmac

from flask import Response, request

from maskclip_service.settings import Settings

OPEN_ROUTES = ("/", "/health")

_REFUSED = '{"error": "authentication required: set the same basic-auth user and password in Label Studio"}'


def refused(settings: Settings) -> Response | None:
    """A 401 answer when the request lacks the configured credentials, else ``None``."""
    if request.path in OPEN_ROUTES or not settings.basic_auth_user:
        return None
    try:
        auth = request.authorization
    except (ValueError, UnicodeError):  # a header that is not base64 of UTF-8: no credentials
        auth = None
    # Compared as UTF-8 bytes: compare_digest refuses non-ASCII str, and a password may hold any character.
    if (
        auth is not None
        and hmac.compare_digest((auth.username or "").encode(), settings.basic_auth_user.encode())
        and hmac.compare_digest((auth.password or "").encode(), (settings.basic_auth_pass or "").encode())
    ):
        return None
    return Response(_REFUSED, 401, {"WWW-Authenticate": 'Basic realm="maskclip"', "Content-Type": "application/json"})
