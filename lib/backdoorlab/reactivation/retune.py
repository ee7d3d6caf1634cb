"""The retuning attack (RA): fine-tune a purified model on a small clean set holding a
handful of poisoned samples and see whether the backdoor comes straight back.

Paper: Min, Qin, Zhang, Shen, Cheng, "Uncovering, Explaining, and Mitigating the
Superficial Safety of Backdoor Defense", NeurIPS 2024 (Sec. 3, "retuning attack").
Threat model: the attacker planted the backdoor (knows the trigger) and may fine-tune the
purified model once on a little data; a defense is only *superficially* safe if the
backdoor returns after so few poisoned samples that a clean model would not learn it.

Defaults as in the official code (``fine_tune/ft_poison.py``; README: ``--split_ratio 0.02
--lr 0.01 --epochs 5 --poison_num 5``): a 2 % clean subset of the training set of which
5 samples are poisoned (trigger + target label), SGD lr 0.01, momentum 0.9, no weight
decay, no scheduler, batch 128, 5 epochs, cross-entropy; the metric is the ASR on the
poisoned test set (the paper's P-ASR).

Deviations from the official code:

- The poisoned samples are the non-target images *of the clean subset itself*, triggered
  and relabelled in place; the code replaces the first ``poison_num`` clean samples by
  unrelated saved poisoned training images. Either way the set has ``n - poison_num``
  clean and ``poison_num`` poisoned samples of random training images; in place keeps the
  composition checkable against the clean originals.
- Triggered images are stored as uint8 (as the code's saved PNGs are).
- ``train.fit`` applies its crop/flip augmentation to every sample; the code augments the
  clean samples only (its poisoned PNGs go through the test transform).
- Training-controlled attacks (WaNet, Input-aware, ...) have no saved poisoned set: their
  test-time trigger ``attack.apply`` is used, as for every other attack.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import data, metrics
from ..data.bundle import TensorBundle, to_float
from ..models import clone
from ..train import Recipe, fit

if TYPE_CHECKING:  # pragma: no cover
    from ..pipeline import AttackResult


def _check(result: "AttackResult", poison_num: int, clean_ratio: float, seed: int) -> torch.Tensor:
    """The clean subset's indices, after checking every argument (no compute)."""
    if result.attack is None:
        raise ValueError("the retuning attack needs an attacked setting (attack='none' has no trigger)")
    if isinstance(poison_num, bool) or not isinstance(poison_num, int) or poison_num < 0:
        raise ValueError(f"poison_num must be an int >= 0, got {poison_num!r}")
    idx = data.clean_subset(result.data, clean_ratio, seed=seed)
    candidates = int(result.attack.test_mask(result.data.train_y[idx.to(result.data.device)]).sum())
    if poison_num > candidates:
        raise ValueError(f"poison_num {poison_num} is larger than the {candidates} non-target samples of the "
                         f"clean subset ({len(idx)} samples at clean_ratio {clean_ratio}); use poison_num <= "
                         f"{candidates} or a larger clean_ratio")
    return idx


def retuning_set(result: "AttackResult", poison_num: int = 5, clean_ratio: float = 0.02,
                 seed: int = 0) -> tuple[TensorBundle, torch.Tensor]:
    """The retuning set as a bundle (its training split; the test split is the setting's)
    and the mask of its poisoned samples.

    The clean subset is ``data.clean_subset(result.data, clean_ratio, seed=seed)``; the
    same ``seed`` picks which ``poison_num`` of its non-target samples get the trigger and
    the target label. Exactly
    ``poison_num`` samples are poisoned; every other sample is untouched."""
    idx = _check(result, poison_num, clean_ratio, seed)
    attack, bundle = result.attack, result.data
    subset = bundle.subset(idx)
    candidates = torch.nonzero(attack.test_mask(subset.train_y)).flatten()
    g = torch.Generator().manual_seed(seed)
    pick = candidates[torch.randperm(len(candidates), generator=g)[:poison_num].to(candidates.device)]
    mask = torch.zeros(len(subset.train_y), dtype=torch.bool, device=bundle.device)
    mask[pick] = True
    x, y = subset.train_x.clone(), subset.train_y.clone()
    if poison_num:
        triggered = attack.apply(to_float(x[pick]))
        x[pick] = triggered.mul(255).round_().clamp_(0, 255).to(torch.uint8)
        y[pick] = attack.target_labels(y[pick], bundle.num_classes)
    retune_set = dataclasses.replace(subset, train_x=x, train_y=y,
                                     meta={**subset.meta, "retuning": {"poison_num": poison_num,
                                                                       "clean_ratio": clean_ratio}})
    return retune_set, mask


def retune(purified: nn.Module, result: "AttackResult", *, poison_num: int = 5, clean_ratio: float = 0.02,
           epochs: int = 5, lr: float = 0.01, batch_size: int = 128, seed: int = 0,
           progress: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The retuning attack on ``purified`` (left unchanged): a fine-tuned copy and a row with
    ``p_asr`` (ASR on the poisoned test set after retuning), ``acc``, ``ra``,
    ``poison_num`` and ``clean_samples`` (size of the retuning set).

    ``poison_num=0`` is the control: the same fine-tuning on clean data only."""
    recipe = Recipe(epochs=epochs, batch_size=batch_size, lr=lr, momentum=0.9, weight_decay=0.0,
                    schedule="constant")
    retune_set, _ = retuning_set(result, poison_num, clean_ratio, seed)
    model = clone(purified)
    fit(model, retune_set, recipe, seed=seed, progress=progress, desc="retuning attack")
    model.eval()
    scores = metrics.evaluate(model, result.data, result.attack)
    row = {"p_asr": scores["asr"], "acc": scores["acc"], "ra": scores["ra"], "poison_num": poison_num,
           "clean_samples": len(retune_set.train_y)}
    return model, row


__all__ = ["retuning_set", "retune"]
