"""The ``Attack`` base class: label modes, poison-index selection and batch poisoning.

A subclass holds only its trigger: ``apply(x)`` maps a batch of images in [0, 1]
(``float[B, C, H, W]``) to poisoned images in one tensor operation. The base class
decides *which* samples are poisoned (``poison_indices``) and *what label* they get
(``target_labels``), the same way BackdoorBench does:

- all-to-one: every poisoned sample is relabelled ``target``; dirty-label indices are
  drawn uniformly from the whole training set (target class included), clean-label
  indices only from the target class;
- all-to-all: label ``y -> (y + 1) mod K``.

``pratio`` is always a fraction of the *whole* training set.

Hooks, all optional:

- ``prepare(data, scale=, seed=, progress=)`` builds data-dependent trigger material
  once (a low-frequency pattern, a trained encoder, crafted images); ``apply`` works
  after it. Material that costs compute is cached in the zoo (``zoo.cached_tensors``).
- ``state_tensors`` / ``load_state_tensors``: what must be saved with the attacked
  model so its trigger can be re-applied later (e.g. a trained trigger generator).
- ``begin_training``, ``training_batch``, ``training_loss``, ``end_epoch``: how a
  training-controlled attack steers ``train.fit`` (the defaults: plain poisoning).
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..losses import cross_entropy

if TYPE_CHECKING:  # pragma: no cover
    from ..data.bundle import TensorBundle

LABEL_MODES = ("all2one", "all2all")


@dataclass
class Attack:
    target: int = 0
    label_mode: str = "all2one"

    name: ClassVar[str] = "attack"
    clean_label: ClassVar[bool] = False
    # Training-controlled attacks (WaNet, Input-aware, LIRA, BppAttack, Blind) change how the victim
    # trains, so there is no fixed poisoned dataset to hand a training-time defense or a data detector.
    controls_training: ClassVar[bool] = False
    # Attacks that need colour (a trigger in the chroma channels) name here the parameters of their
    # documented one-channel variant; `validate` refuses grayscale data without them.
    grayscale_params: ClassVar[dict] = {}
    # Stronger parameters for attacks whose paper defaults cannot be learnt in the `smoke` preset's
    # 4 epochs on MNIST (each attack's docstring says why); the learning tests and every `smoke` run use them
    # (``attacks.params_for(name, shape, "smoke")``), no other scale does.
    smoke_params: ClassVar[dict] = {}
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {', '.join(LABEL_MODES)}, got {self.label_mode!r}")
        if isinstance(self.target, bool) or not isinstance(self.target, int) or self.target < 0:
            raise ValueError(f"target must be a class index >= 0, got {self.target!r}")
        if self.clean_label and self.label_mode != "all2one":
            raise ValueError(f"{self.name} is a clean-label attack: only label_mode='all2one' is defined")

    # -- what every attack defines -------------------------------------------------
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Poison a whole batch of images in [0, 1]; returns a new tensor in [0, 1]."""
        raise NotImplementedError

    # -- shared bookkeeping -----------------------------------------------------------
    def params(self) -> dict[str, Any]:
        """The attack's hyperparameters (what identifies it in the zoo)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def validate(self, num_classes: int, shape: tuple[int, int, int] | None = None) -> None:
        """Check the attack against a dataset's classes and image shape ``(C, H, W)``
        (before any compute). Subclasses extend it with their own constraints."""
        if not 0 <= self.target < num_classes:
            raise ValueError(f"target label {self.target} is outside the dataset's classes 0..{num_classes - 1}")

    # -- hooks (defaults: a plain data-poisoning attack) ---------------------------------
    def prepare(self, data: "TensorBundle", *, scale: Any = None, seed: int = 0, progress: bool = False) -> None:
        """Build data-dependent trigger material before poisoning (default: nothing)."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors saved with an attacked model so its trigger can be applied later."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise ValueError(f"{self.name} keeps no state, got {sorted(tensors)}")

    def begin_training(self, model: nn.Module, data: "TensorBundle", recipe: Any) -> None:
        """Called by ``train.fit`` before the first step."""

    def training_batch(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, idx: torch.Tensor,
                       num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch the model trains on; ``mask`` marks poisoned samples, ``idx`` their dataset indices."""
        return self.poison_batch(x, y, mask, num_classes)

    def training_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The objective for one batch; returns (loss, logits)."""
        return cross_entropy(model, x, y)

    def end_epoch(self, epoch: int) -> None:
        """Called by ``train.fit`` after each epoch."""

    def target_labels(self, y: torch.Tensor, num_classes: int) -> torch.Tensor:
        if self.label_mode == "all2one":
            return torch.full_like(y, self.target)
        return (y + 1) % num_classes

    def eligible(self, labels: torch.Tensor) -> torch.Tensor:
        """Training samples that may be poisoned."""
        if self.clean_label:
            return labels == self.target
        return torch.ones_like(labels, dtype=torch.bool)

    def poison_indices(self, labels: torch.Tensor, pratio: float, seed: int = 0) -> torch.Tensor:
        """Sorted indices of the poisoned training samples: ``int(pratio * N)`` of them
        (clean-label: that many, or the whole target class if it is smaller), drawn with
        a CPU generator so the same seed gives the same indices on every device."""
        check_pratio(pratio)
        labels = labels.cpu()
        pool = torch.nonzero(self.eligible(labels)).squeeze(1)
        count = int(pratio * len(labels))
        if count > len(pool):
            raise ValueError(
                f"{self.name}: pratio {pratio} asks for {count} poisoned samples but only {len(pool)} are eligible "
                f"({'target-class samples' if self.clean_label else 'samples'})"
            )
        g = torch.Generator().manual_seed(seed)
        chosen = pool[torch.randperm(len(pool), generator=g)[:count]]
        return chosen.sort().values

    def poison_batch(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Poison the samples of a batch where ``mask`` is true (no host sync: ``torch.where``)."""
        m = mask.view(-1, 1, 1, 1)
        x = torch.where(m, self.apply(x), x)
        y = y if self.clean_label else torch.where(mask, self.target_labels(y, num_classes), y)
        return x, y

    def test_mask(self, labels: torch.Tensor) -> torch.Tensor:
        """Test samples that form the poisoned test set (all-to-one: true label != target)."""
        if self.label_mode == "all2one":
            return labels != self.target
        return torch.ones_like(labels, dtype=torch.bool)

    def cached(self, key: tuple, build: Any) -> torch.Tensor:
        """Trigger tensors built once per (shape, device, dtype)."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]


def check_pratio(pratio: float) -> None:
    if isinstance(pratio, bool) or not isinstance(pratio, (int, float)) or not 0 < pratio <= 1:
        raise ValueError(f"pratio must be in (0, 1] (a fraction of the training set), got {pratio!r}")


def index_hash(indices: torch.Tensor) -> str:
    """A short fingerprint of a poison-index set, stored with every attack result."""
    return hashlib.sha256(indices.cpu().to(torch.int64).numpy().tobytes()).hexdigest()[:16]
