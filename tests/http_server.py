"""A real HTTP server on 127.0.0.x for tests: serves files and records every request."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response


@dataclass
class FileServer:
    """Serves ``files[path] = bytes``; paths under ``protected`` need ``Authorization: Token <token>``."""

    host: str = "127.0.0.1"
    token: str | None = None
    files: dict[str, bytes] = field(default_factory=dict)
    redirects: dict[str, str] = field(default_factory=dict)
    seen: list[tuple[str, str | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._server = make_server(self.host, 0, self._app, threaded=True)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _app(self, environ, start_response):
        request = Request(environ)
        self.seen.append((request.full_path.rstrip("?"), request.headers.get("Authorization")))
        if request.path in self.redirects:
            response = Response(status=302, headers={"Location": self.redirects[request.path]})
        elif self.token and request.headers.get("Authorization") != f"Token {self.token}":
            response = Response("authentication required", status=401)
        elif request.path in self.files:
            response = Response(self.files[request.path], mimetype="application/octet-stream")
        else:
            response = Response("not found", status=404)
        return response(environ, start_response)

    def close(self) -> None:
        self._server.shutdown()
