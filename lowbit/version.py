"""The package version, in one place: lowbit.__version__ and the exporters' producer fields read it."""

__version__ = "0.1.0"
