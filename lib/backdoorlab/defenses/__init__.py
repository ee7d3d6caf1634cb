"""Backdoor defenses, one file each, found by name:

>>> from backdoorlab import defenses
>>> purified = defenses.create("ft").purify(model, clean)
"""
from __future__ import annotations

from typing import Any

from ..registry import Registry
from .base import Defense

DEFENSES: Registry[Defense] = Registry("defense")
register = DEFENSES.register


def _register_all() -> None:
    """Import every defense module in this package (each registers itself)."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


_register_all()


def create(name: str, **params: Any) -> Defense:
    return DEFENSES.create(name, **params)


def names() -> list[str]:
    return DEFENSES.names()


__all__ = ["Defense", "DEFENSES", "create", "names", "register"]
