"""``maskclip-backend serve``: the backend on one machine, under gunicorn."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys

import click

from maskclip_service.errors import ServiceError
from maskclip_service.settings import Settings


def embedded_worker_command() -> list[str]:
    """The worker the embedded queue starts; CLIP loads on its first job and stays, so an idle machine does not
    hold a second copy."""
    return [sys.executable, "-m", "workers.cli", "--no-preload"]


@click.group()
def main() -> None:
    """MaskCLIP ML backend for Label Studio."""


@main.command()
@click.option("--host", envvar="MASKCLIP_HOST", default="127.0.0.1", show_default=True)
@click.option("--port", envvar="MASKCLIP_PORT", type=int, default=9090, show_default=True)
@click.option(
    "--threads",
    envvar="MASKCLIP_THREADS",
    type=int,
    default=4,
    show_default=True,
    help="Requests served at once; they share one loaded model.",
)
@click.option(
    "--timeout",
    envvar="MASKCLIP_REQUEST_TIMEOUT",
    type=int,
    default=600,
    show_default=True,
    help="Seconds a request may take before its worker is restarted.",
)
@click.option("--log-level", envvar="LOG_LEVEL", default="INFO", show_default=True)
def serve(host: str, port: int, threads: int, timeout: int, log_level: str) -> None:
    """Load the model once and serve Label Studio's ML backend protocol.

    Without REDIS_URL, an embedded Redis and one training worker start beside
    the server, so one machine needs no other services.
    """
    from gunicorn.app.base import BaseApplication

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_env()
    except ServiceError as exc:
        raise click.ClickException(str(exc)) from exc
    embedded = None
    if not settings.redis_url:
        from maskclip_service.embedded_queue import EmbeddedQueue

        embedded = EmbeddedQueue(settings.model_dir / ".queue", embedded_worker_command())
        os.environ["REDIS_URL"] = embedded.url
        settings = dataclasses.replace(settings, redis_url=embedded.url)

    class _Server(BaseApplication):
        def load_config(self) -> None:
            self.cfg.set("bind", f"{host}:{port}")
            self.cfg.set("workers", 1)  # one process holds the model; threads share it
            self.cfg.set("threads", threads)
            self.cfg.set("timeout", timeout)
            self.cfg.set("accesslog", "-")
            self.cfg.set("loglevel", log_level.lower())
            if embedded is not None:
                self.cfg.set("on_exit", lambda _arbiter: embedded.stop())

        def load(self):
            from maskclip_engine import MaskClipError

            from .app import create_app

            try:
                return create_app(settings)
            except (MaskClipError, ServiceError) as exc:
                logging.getLogger("backend").error("cannot start the backend: %s", exc)
                raise SystemExit(3) from None  # gunicorn's "worker failed to boot": it stops, no restart loop

    try:
        _Server().run()
    finally:
        if embedded is not None and embedded.worker.poll() is None:
            embedded.stop()
