"""Fetching task images without letting a task point the backend anywhere it likes.

An image URL is served only if it is on the Label Studio host (fetched with the
API key), under the local-files document root (read from disk), inline as a
``data:`` URL, or on a host listed in ``MASKCLIP_ALLOWED_HOSTS`` (fetched with
no credentials). Sizes are capped before and while downloading, and pixel
counts before decoding.
"""

from __future__ import annotations

import base64
import binascii
import logging
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

import numpy as np
import requests

from maskclip_engine import InvalidImageError
from maskclip_engine.images import decode_image
from maskclip_service.origins import host_allowed, origin
from maskclip_service.settings import Settings

from .auth import LabelStudioAuth
from .errors import ImageFetchError, ImageHostUnreachableError
from .ids import is_id
from .retrying import retrying_session

log = logging.getLogger(__name__)

_CLOUD_SCHEMES = ("s3://", "gs://", "azure-blob://")
_MAX_REDIRECTS = 3


class ImageFetcher:
    """Turns a task's image reference into an ``HxWx3 uint8`` array, or raises :class:`ImageFetchError`."""

    def __init__(self, settings: Settings, auth: LabelStudioAuth | None) -> None:
        self.settings = settings
        self.auth = auth
        # No proxies picked up from the environment for task URLs; transient failures are retried.
        self.session = retrying_session(settings.fetch_retries, trust_env=False)

    def fetch(self, reference: object, task_id: object = None) -> np.ndarray:
        data = self.read_bytes(reference, task_id)
        try:
            return decode_image(data, max_pixels=self.settings.max_image_pixels)
        except InvalidImageError as exc:
            raise ImageFetchError(str(exc)) from exc

    def read_bytes(self, reference: object, task_id: object = None) -> bytes:
        if not isinstance(reference, str) or not reference.strip():
            raise ImageFetchError(f"the task's image field is {reference!r}, not a URL.")
        url = reference.strip()
        if url.startswith("data:"):
            return self._inline(url)
        if url.startswith(_CLOUD_SCHEMES):
            if task_id is None:
                raise ImageFetchError(f"{url} is in cloud storage and needs a task id to be presigned.")
            if not is_id(task_id if isinstance(task_id, int) else str(task_id)):  # it becomes part of an API path
                raise ImageFetchError(f"task id {str(task_id)[:40]!r} is not a Label Studio task id.")
            presign = base64.urlsafe_b64encode(url.encode()).decode()
            return self._download(f"/tasks/{task_id}/presign/?fileuri={presign}")
        local = self._local_file(url)
        if local is not None:
            return local
        return self._download(url)

    # ------------------------------------------------------------ sources
    def _inline(self, url: str) -> bytes:
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise ImageFetchError("data: URLs must be base64-encoded images.")
        if len(payload) * 3 // 4 > self.settings.max_image_bytes:
            raise ImageFetchError(f"the inline image is larger than {self.settings.max_image_bytes:,} bytes.")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ImageFetchError(f"the inline image is not valid base64: {exc}") from exc

    def _local_file(self, url: str) -> bytes | None:
        """Local-files URLs read from disk when the document root is shared with this backend."""
        parts = urlsplit(url)
        if not parts.path.rstrip("/").endswith("/data/local-files") or self.settings.local_files_root is None:
            return None
        if parts.netloc and not (self.auth and self.auth.same_origin(url)):
            return None  # somebody else's local-files URL: treated like any other remote URL
        relative = unquote(parse_qs(parts.query).get("d", [""])[0])
        root = self.settings.local_files_root.resolve()
        path = (root / relative).resolve()
        if not relative or not path.is_relative_to(root):
            raise ImageFetchError(f"local file {relative!r} is outside LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT.")
        try:
            size = path.stat().st_size
            if size > self.settings.max_image_bytes:
                raise ImageFetchError(f"{path} is {size:,} bytes, over {self.settings.max_image_bytes:,}.")
            return path.read_bytes()
        except FileNotFoundError:
            raise ImageFetchError(f"local file {relative!r} does not exist under the document root.") from None
        except OSError as exc:
            raise ImageFetchError(f"local file {relative!r} could not be read: {exc}") from exc

    def _download(self, url: str) -> bytes:
        if not urlsplit(url).scheme:
            if self.auth is None:
                raise ImageFetchError(
                    f"{url} is on the Label Studio server, but the backend does not know where that is: set "
                    "LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY (or connect the model from Label Studio)."
                )
            url = urljoin(self.auth.url + "/", url.lstrip("/"))
        for _ in range(_MAX_REDIRECTS + 1):
            headers = self._headers_for(url)
            try:
                response = self.session.get(
                    url, headers=headers, stream=True, timeout=self.settings.fetch_timeout, allow_redirects=False
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                raise ImageHostUnreachableError(
                    f"could not download {_safe(url)}: {exc.__class__.__name__} after "
                    f"{self.settings.fetch_retries} retries"
                ) from exc
            except requests.RequestException as exc:
                raise ImageFetchError(f"could not download {_safe(url)}: {exc.__class__.__name__}") from exc
            with response:
                if response.is_redirect:
                    url = urljoin(url, response.headers.get("location", ""))
                    continue
                if response.status_code != 200:
                    raise ImageFetchError(f"{_safe(url)} answered HTTP {response.status_code}.")
                return self._read_limited(response, url)
        raise ImageFetchError(f"{_safe(url)} redirects more than {_MAX_REDIRECTS} times.")

    def _headers_for(self, url: str) -> dict[str, str]:
        scheme, host, port = origin(url)
        if scheme not in ("http", "https"):
            raise ImageFetchError(f"{_safe(url)} is not an http(s) URL.")
        if self.auth is not None and self.auth.same_origin(url):
            return self.auth.headers()
        if host_allowed(url, self.settings.allowed_hosts):
            return {}
        raise ImageFetchError(
            f"{scheme}://{host}:{port} is neither the Label Studio host nor in MASKCLIP_ALLOWED_HOSTS; the backend "
            "does not fetch from arbitrary hosts. Add it to MASKCLIP_ALLOWED_HOSTS (scheme://host:port) if it is "
            "trusted."
        )

    def _read_limited(self, response: requests.Response, url: str) -> bytes:
        limit = self.settings.max_image_bytes
        declared = response.headers.get("content-length")
        if declared and is_id(declared) and int(declared) > limit:
            raise ImageFetchError(f"{_safe(url)} is {int(declared):,} bytes, over the limit of {limit:,}.")
        chunks, total = [], 0
        for chunk in response.iter_content(1 << 16):
            total += len(chunk)
            if total > limit:
                raise ImageFetchError(f"{_safe(url)} is larger than the limit of {limit:,} bytes.")
            chunks.append(chunk)
        return b"".join(chunks)


def _safe(url: str) -> str:
    """A URL for logs and messages: no query string (it may carry signatures or tokens)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}" if parts.scheme else parts.path
