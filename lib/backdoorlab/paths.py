"""Where things live. Every path the package uses is resolved here, never
relative to the working directory (notebooks run from anywhere).

Environment variables override the defaults:

- ``BACKDOORLAB_RUNS``: run outputs and the model zoo (default ``<checkout>/runs``,
  or ``~/.backdoorlab/runs`` for a non-editable install).
- ``BACKDOORLAB_DATA``: downloaded datasets (default ``<checkout>/data``, or
  ``~/.backdoorlab/data``).
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def checkout_root() -> Path | None:
    """The repository root when the package is used from a checkout (``lib/backdoorlab``)."""
    root = PACKAGE_DIR.parent.parent
    return root if (root / "pyproject.toml").exists() and (root / "notebooks").is_dir() else None


def _home() -> Path:
    root = checkout_root()
    return root if root is not None else Path.home() / ".backdoorlab"


def runs_dir() -> Path:
    return Path(os.environ.get("BACKDOORLAB_RUNS") or _home() / "runs")


def zoo_dir() -> Path:
    return runs_dir() / "zoo"


def data_dir() -> Path:
    return Path(os.environ.get("BACKDOORLAB_DATA") or _home() / "data")


def notebooks_dir() -> Path:
    root = checkout_root()
    if root is None:
        raise FileNotFoundError("the notebooks ship with the repository checkout, not the installed package")
    return root / "notebooks"
