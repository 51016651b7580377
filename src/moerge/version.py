"""The package version (read by the writer, the model card and ``moerge --version``)."""

__version__ = "0.1.0"
