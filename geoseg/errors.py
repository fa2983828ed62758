"""Errors and warnings raised by geoseg.

Every error a user can cause derives from :class:`GeosegError`, mixed with the matching builtin
(as rasterio does), so the CLI can turn it into a one-line message and callers can still catch
``ValueError`` or ``ImportError``.
"""


class GeosegError(Exception):
    """Root of every error geoseg raises on purpose."""


class InputError(GeosegError, ValueError):
    """The input scene is missing, unreadable or does not fit the model."""


class OutputError(GeosegError, ValueError):
    """The destination cannot be written (exists, bad folder, same as the source)."""


class ConfigError(GeosegError, ValueError):
    """A configuration key or value is unknown or invalid."""


class CheckpointError(GeosegError):
    """A model file is missing, corrupt, unsafe or incompatible."""


class DependencyNotFoundError(GeosegError, ImportError):
    """An optional dependency is not installed."""


class GeosegWarning(UserWarning):
    """Base class of geoseg's warnings."""


class NodataWarning(GeosegWarning):
    """The scene has no valid pixel, or nodata handling needs the user's attention."""


class GeoreferenceWarning(GeosegWarning):
    """The scene has no CRS or an unusual transform; it is predicted in pixel space."""
