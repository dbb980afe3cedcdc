"""Command line interface (``lowbit``)."""

from .main import app, run

__all__ = ["app", "run"]
