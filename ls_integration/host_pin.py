"""The one Label Studio host this backend talks to, whatever ``/setup`` says.

``/setup`` carries a ``hostname`` that becomes the server the backend fetches
task images from (with the project's token) and reads training data from. Left
open, anyone who can reach the backend could point it at an internal address,
or at a server of their own that feeds a poisoned training set. So:

- with ``LABEL_STUDIO_URL`` set, that is the host; a ``hostname`` in ``/setup``
  is ignored (Label Studio often names itself differently, e.g. ``localhost``);
- without it, the first host a ``/setup`` names is kept for the whole backend,
  in ``MODEL_DIR/label_studio_host.json`` so restarts, replicas and workers
  agree, and a ``/setup`` naming any other host is refused.

Hosts are compared as scheme, host name and port.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from maskclip_engine.atomic import atomic_write
from maskclip_service.origins import origin

from .errors import BadRequestError, HostNotAllowedError

log = logging.getLogger(__name__)

PIN_FILE = "label_studio_host.json"


def pin_path(model_dir: Path) -> Path:
    return Path(model_dir) / PIN_FILE


def pinned_host(model_dir: Path) -> str | None:
    """The host kept by an earlier ``/setup``, or None."""
    try:
        value = json.loads(pin_path(model_dir).read_text()).get("url")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def _normalise(url: str) -> str:
    scheme, host, port = origin(url)
    default = 443 if scheme == "https" else 80
    return f"{scheme}://{host}" + ("" if port == default else f":{port}")


class HostPin:
    """Decides which Label Studio host a ``/setup`` may use; safe across threads, processes and hosts."""

    def __init__(self, label_studio_url: str | None, model_dir: Path) -> None:
        self.fixed = label_studio_url
        self.path = pin_path(model_dir)
        self._lock = threading.Lock()

    def admit(self, hostname: object) -> str | None:
        """The host to store for a ``/setup`` that named ``hostname``; raises when it is not the pinned one."""
        if self.fixed:
            return self.fixed
        if hostname is None or hostname == "":
            return pinned_host(self.path.parent)
        if not isinstance(hostname, str) or not hostname.startswith(("http://", "https://")):
            raise BadRequestError(f"'hostname' {hostname!r} is not an http(s) URL of a Label Studio server.")
        try:
            wanted = _normalise(hostname)
        except ValueError as exc:  # a bad port, for one
            raise BadRequestError(f"'hostname' {hostname!r} is not a valid URL: {exc}") from None
        with self._lock:
            pinned = pinned_host(self.path.parent) or self._pin(wanted)
        if origin(pinned) != origin(wanted):
            log.warning("refused /setup naming Label Studio at %s; this backend is pinned to %s", wanted, pinned)
            raise HostNotAllowedError(
                f"this backend works with the Label Studio at {pinned} (the first one connected, kept in "
                f"{self.path}); a /setup naming {wanted} is refused. Set LABEL_STUDIO_URL to choose the host, "
                "or remove that file and restart the backend to connect another one."
            )
        return pinned

    def _pin(self, url: str) -> str:
        """Keep ``url`` unless another process pinned a host first: the file is created, never replaced."""
        staged = self.path.with_name(f".{PIN_FILE}.{os.getpid()}.{threading.get_ident()}.staged")
        atomic_write(staged, lambda handle: handle.write(json.dumps({"url": url}).encode()))
        try:
            os.link(staged, self.path)  # fails if the file exists: the first writer wins everywhere
            log.info("Label Studio host pinned to %s (%s)", url, self.path)
        except FileExistsError:
            pass
        finally:
            staged.unlink(missing_ok=True)
        return pinned_host(self.path.parent) or url
