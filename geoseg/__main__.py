"""Allow ``python -m geoseg``."""

from .cli import run

run()
