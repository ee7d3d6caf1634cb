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

from . import ft  # noqa: E402,F401  (registers the defenses)


def create(name: str, **params: Any) -> Defense:
    return DEFENSES.create(name, **params)


def names() -> list[str]:
    return DEFENSES.names()


__all__ = ["Defense", "DEFENSES", "create", "names", "register"]
