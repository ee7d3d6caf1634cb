"""Backdoor attacks, one file each, found by name:

>>> from backdoorlab import attacks
>>> attack = attacks.create("badnets", target=0)
"""
from __future__ import annotations

from typing import Any

from .. import scales
from ..registry import Registry
from .base import LABEL_MODES, Attack, check_pratio, index_hash

ATTACKS: Registry[Attack] = Registry("attack")
register = ATTACKS.register


def _register_all() -> None:
    """Import every attack module in this package (each registers itself)."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        if module.name not in {"base", "patterns", "surrogate"}:
            importlib.import_module(f"{__name__}.{module.name}")


_register_all()


def create(name: str, **params: Any) -> Attack:
    return ATTACKS.create(name, **params)


def names() -> list[str]:
    return ATTACKS.names()


def params_for(name: str, image_shape: tuple[int, int, int], scale: str | None = None) -> dict[str, Any]:
    """The parameters that adapt attack ``name`` to images of ``image_shape`` ``(C, H, W)``
    and to a run's ``scale``: on one-channel data, an attack that needs colour (FTrojan, CTRL)
    gets its documented luma variant; at ``scale="smoke"`` an attack whose paper defaults
    cannot be learnt in that preset's 4 epochs on MNIST gets its ``smoke_params`` (the
    setting of its learning test); otherwise nothing. The notebooks use this for every attack."""
    attack = ATTACKS.get(name)
    params = dict(attack.grayscale_params) if image_shape[0] == 1 else {}
    if scale is not None and scales.get(scale).name == "smoke":
        params.update(attack.smoke_params)
    return params


__all__ = ["Attack", "ATTACKS", "create", "names", "params_for", "register", "check_pratio", "index_hash", "LABEL_MODES"]
