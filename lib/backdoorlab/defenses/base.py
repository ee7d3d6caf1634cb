"""The ``Defense`` base classes.

Two threat models, two entry points:

- ``Defense.purify(model, clean)`` (post-training purification: FT, FP, NAD, ANP, ...)
  returns a purified copy of a trained, possibly backdoored ``model`` (the input is
  never modified). ``clean`` is the defender's clean subset as a ``TensorBundle``
  (5% of the training set by default, never the test set).
- A purification defense with ``data_source = "poisoned_training_set"`` (EP) gets the
  training set the model was trained on, poisoned samples unidentified, instead.
- ``TrainingDefense.train(model, poisoned)`` (training-time defenses: ABL, DBD) trains
  the freshly initialised ``model`` on the whole *poisoned* training set, whose
  poisoned samples the defender does not know.

Hyperparameters left as ``None`` take the scale preset's value. Choices a defense
makes (how many neurons to prune, which threshold) use only the defender's data;
BackdoorBench's selection by *test* ASR (its issue #35) is never the default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from .. import scales
from ..data.bundle import TensorBundle
from ..models import clone
from ..train import Recipe


def _plain(value: Any) -> bool:
    """Whether ``value`` is JSON made of numbers, strings, booleans, lists and dicts (no tensors)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


@dataclass
class Defense:
    name: ClassVar[str] = "defense"
    # "purification": needs a trained model and clean data; "training": trains on the poisoned set.
    kind: ClassVar[str] = "purification"
    # What `purify` is handed: "clean" (the defender's clean subset) or "poisoned_training_set" (the
    # unlabelled-as-poisoned training set the model was trained on, e.g. EP's threat model).
    data_source: ClassVar[str] = "clean"
    # Whether a rerun after a crash may resume the defense's ``fit`` calls from their per-epoch
    # checkpoints (``paper`` scale, ``train.checkpoints``); False where a loss or an optimiser
    # hook keeps a step count that ``fit`` does not save, so a resumed run would differ.
    resumable: ClassVar[bool] = True

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def recipe(self, scale: Any, epochs: int | None = None, lr: float = 0.01, batch_size: int | None = None,
               **options: Any) -> Recipe:
        """The fine-tuning recipe of a defense at ``scale``: BackdoorBench's SGD (momentum 0.9,
        wd 5e-4, cosine) with the preset's defense epochs and batch size unless given."""
        preset = scales.get(scale)
        return Recipe(epochs=epochs or preset.defense_epochs, lr=lr,
                      batch_size=batch_size or preset.defense_batch_size, **options)

    def diagnostics(self) -> dict[str, Any]:
        """What the last ``purify``/``train`` chose, for the record: the fields ending in ``_``
        (e.g. TSBD's ``n_ratio_``, ABL's isolation counts) whose values are JSON numbers,
        strings, or lists/dicts of them; tensors are left out."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name.endswith("_") and not f.init:
                value = getattr(self, f.name)
                if _plain(value):
                    out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def module_for(self, model: nn.Module) -> nn.Module:
        """An untrained module with the structure this defense returns for ``model`` (a saved
        result loads into it). Most defenses keep the structure: a copy of ``model``; one that
        inserts a layer (NPD's polarizer) inserts it here too."""
        return clone(model)

    def purify(self, model: nn.Module, clean: TensorBundle, *, scale: Any = None, seed: int = 0,
               progress: bool = True) -> nn.Module:
        raise NotImplementedError


@dataclass
class TrainingDefense(Defense):
    """A defense that controls training on the poisoned training set (ABL, DBD)."""

    kind: ClassVar[str] = "training"

    def train(self, model: nn.Module, poisoned: TensorBundle, *, scale: Any = None, seed: int = 0,
              progress: bool = True) -> nn.Module:
        """Train ``model`` (freshly initialised) on ``poisoned``, a bundle whose training split
        holds the poisoned training set exactly as the victim received it."""
        raise NotImplementedError

    def purify(self, model: nn.Module, clean: TensorBundle, **kwargs: Any) -> nn.Module:
        raise TypeError(f"{self.name} is a training-time defense: it trains on the poisoned set "
                        "(pipeline.defend does this), it does not purify a trained model")
