"""The package version, kept apart so packaging can read it without importing geoseg."""

__version__ = "0.1.0"
