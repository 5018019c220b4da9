"""Exceptions raised for problems a user can cause and fix.

Every message says what went wrong and what to do about it; callers (the CLI,
the HTTP backend) show the message as it is.
"""


class MaskClipError(Exception):
    """Base class of every error the engine raises on purpose."""


class ModelNotFoundError(MaskClipError):
    """The model name is not an open_clip architecture or config file."""


class WeightsUnavailableError(MaskClipError):
    """The weights could not be found, downloaded or read."""


class UnsupportedModelError(MaskClipError):
    """The architecture has no MaskCLIP dense path (only ViT and ModifiedResNet do)."""


class InvalidImageError(MaskClipError):
    """An image could not be read or has no pixels."""


class InvalidLabelsError(MaskClipError):
    """The label list is empty or malformed."""


class InvalidOptionError(MaskClipError):
    """A segmentation or model option has an unknown name or a bad value."""


class DeviceMemoryError(MaskClipError):
    """A single window does not fit the device's memory (batches that do not fit are halved instead)."""
