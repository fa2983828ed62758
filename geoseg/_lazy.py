"""Import optional dependencies on first use, with the pip command in the error."""

import importlib
from types import ModuleType

from .errors import DependencyNotFoundError


def lazy_import(name: str, extra: str, package: str | None = None) -> ModuleType:
    """Import module ``name`` or explain how to install it.

    Args:
        name: Dotted module name, e.g. ``"pydensecrf.densecrf"``.
        extra: The geoseg extra that provides it, e.g. ``"crf"``.
        package: The pip distribution, when it differs from the top-level module name.

    Raises:
        DependencyNotFoundError: The module is not installed.
    """
    try:
        return importlib.import_module(name)
    except ImportError as err:
        dist = package or name.split(".")[0]
        raise DependencyNotFoundError(
            f"{name} is not installed; install it with: pip install 'geoseg[{extra}]' (or pip install {dist})"
        ) from err
