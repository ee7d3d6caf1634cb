"""Backdoor detectors (AC, Spectral signatures, STRIP), one file each, found by name:

>>> from backdoorlab import detectors
>>> scores = detectors.create("spectral").score(model, x, y, clean)
"""
from __future__ import annotations

from typing import Any

from ..registry import Registry
from .base import Detector

DETECTORS: Registry[Detector] = Registry("detector")
register = DETECTORS.register


def _register_all() -> None:
    """Import every detector module in this package (each registers itself)."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


_register_all()


def create(name: str, **params: Any) -> Detector:
    return DETECTORS.create(name, **params)


def names() -> list[str]:
    return DETECTORS.names()


__all__ = ["Detector", "DETECTORS", "create", "names", "register"]
