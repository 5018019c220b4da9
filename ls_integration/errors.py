"""Errors about Label Studio and what it sends: clear HTTP answers for the backend, per-task reasons for runs."""

from maskclip_service.errors import ServiceError


class LabelStudioError(ServiceError):
    """Base class of this package's errors; ``status`` is the HTTP status a request that meets it gets."""


class UnsupportedLabelConfigError(LabelStudioError):
    """The project's labeling config has nothing this backend can predict."""


class BadRequestError(LabelStudioError):
    """The request body is not what Label Studio sends."""


class TooManyTasksError(LabelStudioError):
    """A request carries more work than the backend's limits allow."""

    status = 413


class ImageFetchError(LabelStudioError):
    """A task's image could not be fetched or is not allowed; the task gets an empty prediction."""


class ImageHostUnreachableError(ImageFetchError):
    """The image's host did not answer at all (connection refused, timed out), even after retries."""


class HostNotAllowedError(LabelStudioError):
    """A ``/setup`` named a Label Studio host other than the pinned one."""

    status = 403


class ProjectDataError(LabelStudioError):
    """The project cannot be read from Label Studio, or the worker does not know where it is."""


class AnnotationError(ValueError):
    """An annotation whose regions cannot be read; it is skipped, its image still trains."""
