"""Which Label Studio a project's work talks to, and with which key: one rule for the backend and every job.

``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY``, when set, win. Otherwise
the host and key that ``/setup`` recorded for the project in the shared model
folder (:mod:`.project_links`) are used, and only while that host is the one
this backend is pinned to (:mod:`.host_pin`): a link written before the pin,
or by hand, cannot send a job or a fetch elsewhere.
"""

from __future__ import annotations

from maskclip_service.origins import origin
from maskclip_service.settings import Settings

from .auth import LabelStudioAuth
from .errors import HostNotAllowedError, ProjectDataError
from .host_pin import pinned_host
from .project_links import ProjectLinks


def label_studio_target(
    settings: Settings, project: str | int | None, links: ProjectLinks | None = None
) -> tuple[str, str | None] | None:
    """The Label Studio URL and API key for ``project``; ``None`` when nothing says where it is."""
    link = (links or ProjectLinks(settings.model_dir)).load(project) if project else None
    url = settings.label_studio_url or (link.hostname if link else None)
    token = settings.label_studio_api_key or (link.access_token if link else None)
    if not url:
        return None
    if not settings.label_studio_url:
        pinned = pinned_host(settings.model_dir)
        if pinned is not None and origin(pinned) != origin(url):
            raise HostNotAllowedError(
                f"project {project} names Label Studio at {url}, but this backend is pinned to {pinned}; "
                "connect the model again from the pinned Label Studio, or set LABEL_STUDIO_URL."
            )
    return url, token


def label_studio_for(
    settings: Settings, project: str | int | None, links: ProjectLinks | None = None
) -> LabelStudioAuth | None:
    """:func:`label_studio_target` as an authenticated client identity."""
    target = label_studio_target(settings, project, links)
    return LabelStudioAuth(*target) if target is not None else None


def require_label_studio(settings: Settings, project: str | int, links: ProjectLinks | None = None) -> LabelStudioAuth:
    """:func:`label_studio_for`, for jobs that cannot work without it: a clear error when it is unknown."""
    auth = label_studio_for(settings, project, links)
    if auth is None:
        raise ProjectDataError(
            f"the worker does not know where project {project}'s Label Studio is: set LABEL_STUDIO_URL and "
            "LABEL_STUDIO_API_KEY, or connect the model to the project in Label Studio first."
        )
    return auth
