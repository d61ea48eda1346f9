"""The ``gradcamo-dask`` command (``python -m gradcamo_dask.cli`` runs it too)."""

from gradcamo_dask.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
