"""The package version, in a module of its own so that library code can record it in
checkpoints and run directories without importing the package's `__init__`."""

__version__ = "0.1.0"
