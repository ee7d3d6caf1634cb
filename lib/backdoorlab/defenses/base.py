"""The ``Defense`` base class.

``purify(model, clean)`` returns a purified copy of ``model`` (the input is never
modified). ``clean`` is the defender's clean subset as a ``TensorBundle`` (5% of the
training set by default, never the test set): a defense sees only what its threat
model grants. Hyperparameters left as ``None`` take the scale preset's value.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..data.bundle import TensorBundle


@dataclass
class Defense:
    name: ClassVar[str] = "defense"

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def purify(self, model: nn.Module, clean: TensorBundle, *, scale: Any = None, seed: int = 0, progress: bool = True) -> nn.Module:
        raise NotImplementedError
