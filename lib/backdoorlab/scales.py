"""Scale presets: one visible place for how big a run is.

- ``smoke``: for tests; seconds on one CPU core (tiny width, few epochs, subsets).
- ``default``: the embedded main job on a CPU laptop with bundled data; minutes.
  The phenomena must show (a working backdoor, defenses that change it), not the
  papers' absolute numbers.
- ``paper``: the papers' exact hyperparameters (BackdoorBench: PreAct-ResNet18 width
  64, SGD 0.01, batch 128, cosine, 100 epochs on CIFAR-10); for a GPU.

A notebook's ``scale`` parameter defaults to ``$BACKDOORLAB_SCALE``, else ``default``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Scale:
    name: str
    width: int  # model width (64 = paper)
    epochs: int  # attack (backdoor) training epochs
    batch_size: int  # attack training batch size
    train_limit: int | None  # cap on training samples (None = all)
    test_limit: int | None  # cap on test samples (None = all)
    defense_epochs: int  # fine-tuning epochs of defenses (FT: 100 in BackdoorBench)
    defense_batch_size: int

    def attack_epochs(self, dataset: str) -> int:
        """BackdoorBench trains 100 epochs on CIFAR, 50 on GTSRB and 200 on Tiny-ImageNet."""
        if self.name != "paper":
            return self.epochs
        return {"gtsrb": 50, "tiny-imagenet": 200}.get(dataset, self.epochs)


SCALES = {
    "smoke": Scale("smoke", width=8, epochs=4, batch_size=32, train_limit=2000, test_limit=500,
                   defense_epochs=3, defense_batch_size=32),
    "default": Scale("default", width=16, epochs=12, batch_size=128, train_limit=None, test_limit=None,
                     defense_epochs=20, defense_batch_size=32),
    "paper": Scale("paper", width=64, epochs=100, batch_size=128, train_limit=None, test_limit=None,
                   defense_epochs=100, defense_batch_size=256),
}


def default_scale() -> str:
    return os.environ.get("BACKDOORLAB_SCALE") or "default"


def get(scale: str | Scale | None = None) -> Scale:
    if isinstance(scale, Scale):
        return scale
    name = scale or default_scale()
    if name not in SCALES:
        raise ValueError(f"unknown scale {name!r}; valid choices: {', '.join(SCALES)}")
    return SCALES[name]
