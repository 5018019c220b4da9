"""Errors of the service runtime; each carries the HTTP status a request that meets it gets."""


class ServiceError(Exception):
    """Base class of every error the backend and workers raise on purpose; ``status`` is its HTTP status."""

    status = 400


class ConfigurationError(ServiceError):
    """An environment variable has a value the backend cannot use."""

    status = 500


class QueueUnavailableError(ServiceError):
    """Work cannot be queued right now (no queue configured, or Redis unreachable)."""

    status = 503


class WarmupBusyError(ServiceError):
    """Too many label configs are being prepared at once (a flood of new configs)."""

    status = 429


class JobSupersededError(ServiceError):
    """Another training job owns this project now; this one stops without storing or promoting anything."""

    status = 409


class PreannotationError(ServiceError):
    """A pre-annotation run cannot go on (its version is unknown, or Label Studio is not known)."""
