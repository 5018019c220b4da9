"""Errors the backend turns into clear HTTP answers or per-task reasons."""


class BackendError(Exception):
    """Base class; ``status`` is the HTTP status the request gets."""

    status = 400


class ConfigurationError(BackendError):
    """An environment variable has a value the backend cannot use."""

    status = 500


class UnsupportedLabelConfigError(BackendError):
    """The project's labeling config has nothing this backend can predict."""


class BadRequestError(BackendError):
    """The request body is not what Label Studio sends."""


class ImageFetchError(BackendError):
    """A task's image could not be fetched or is not allowed; the task gets an empty prediction."""


class ImageHostUnreachableError(ImageFetchError):
    """The image's host did not answer at all (connection refused, timed out), even after retries."""


class WarmupBusyError(BackendError):
    """Too many label configs are being prepared at once (a flood of new configs)."""

    status = 429


class QueueUnavailableError(BackendError):
    """Training cannot be queued right now."""

    status = 503


class TooManyTasksError(BackendError):
    """A request carries more work than the backend's limits allow."""

    status = 413
