"""Allow ``python -m geoseg``."""

from .cli import main

main()
