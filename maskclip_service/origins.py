"""URL origins (scheme, host, port) and the ``MASKCLIP_ALLOWED_HOSTS`` allow-list that matches them."""

from __future__ import annotations

from urllib.parse import urlsplit


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
