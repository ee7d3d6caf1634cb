"""What every re-activation attack shares: the attacker's poisoned samples, a budget
projection for a universal perturbation, and the ASR of a model under a perturbation.

Threat model of the re-activation papers (Zhu et al., NeurIPS 2024; Min et al., NeurIPS
2024): the attacker planted the backdoor, so it knows the trigger and holds poisoned
samples; after the victim purified the model, the attacker searches a small *universal*
perturbation ``delta`` that, added on top of the original trigger, makes the purified
model predict the target again. ``delta`` lives in [0, 1] pixel space and is applied as
``clamp(attack.apply(x) + delta, 0, 1)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .. import scales
from ..data.bundle import to_float
from ..metrics import accuracy
from ..train import predict

if TYPE_CHECKING:  # pragma: no cover
    from ..pipeline import AttackResult

NORMS = ("linf", "l2")


@dataclass(frozen=True)
class Budget:
    """How much search the re-activation attacks get at a scale (the notebooks' ``0`` values).

    ``paper``: the official code's values (1000 poisoned samples; white-box 50 epochs x 5 steps;
    Square Attack up to 10000 queries; transfer 100 epochs; BEC on 500 images; QRA 50 epochs on 500 + 500 samples).
    ``default``: a CPU laptop in minutes; ``smoke``: seconds, for tests."""

    poison_num: int
    wb_outer_steps: int
    wb_inner_steps: int
    square_queries: int
    transfer_steps: int
    bec_samples: int
    qra_epochs: int
    qra_samples: int  # clean and poisoned samples each


BUDGETS = {
    "smoke": Budget(poison_num=128, wb_outer_steps=3, wb_inner_steps=5, square_queries=60, transfer_steps=5,
                    bec_samples=200, qra_epochs=2, qra_samples=128),
    "default": Budget(poison_num=500, wb_outer_steps=3, wb_inner_steps=5, square_queries=100, transfer_steps=10,
                      bec_samples=500, qra_epochs=10, qra_samples=500),
    "paper": Budget(poison_num=1000, wb_outer_steps=50, wb_inner_steps=5, square_queries=10000, transfer_steps=100,
                    bec_samples=500, qra_epochs=50, qra_samples=500),
}


def budget(scale: str | None = None) -> Budget:
    """The re-activation budget of ``scale`` (default: ``$BACKDOORLAB_SCALE``, else ``default``)."""
    return BUDGETS[scales.get(scale).name]


def check_budget(norm: str, eps: float) -> None:
    """Raise a clear error for an unknown norm or a non-positive budget."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid choices: {', '.join(NORMS)}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")


def project(delta: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """``delta`` (a batch of perturbations, or one with a leading dim of 1) projected onto
    the ``norm`` ball of radius ``eps``: clamp for L-inf, per-sample rescale for L2."""
    check_budget(norm, eps)
    if norm == "linf":
        return delta.clamp(-eps, eps)
    flat = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    scale = (eps / flat).clamp(max=1.0)
    return delta * scale.view(-1, *([1] * (delta.dim() - 1)))


def budget_of(delta: torch.Tensor, norm: str) -> float:
    """The size of ``delta`` in ``norm`` (the largest over a batch)."""
    check_budget(norm, 1.0)
    if norm == "linf":
        return float(delta.abs().max())
    return float(delta.flatten(1).norm(dim=1).max())


def apply_delta(x: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    """``clamp(x + delta, 0, 1)`` (``x`` in [0, 1]; ``delta`` broadcast; None = no change)."""
    return x if delta is None else (x + delta).clamp(0, 1)


def poisoned_samples(result: "AttackResult", n: int = 1000, split: str = "train",
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attacker's poisoned samples: up to ``n`` images of ``split`` whose true label
    is not the target (all-to-one) with the trigger applied, as [0, 1] floats, with their
    target labels and their true labels. ``train`` (the default) is what the attacker
    poisoned; the test split is for evaluation only."""
    if result.attack is None:
        raise ValueError("re-activation needs an attacked setting (attack='none' has no trigger)")
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; valid choices: train, test")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    bundle, attack = result.data, result.attack
    x_all = bundle.train_x if split == "train" else bundle.test_x
    y_all = bundle.train_y if split == "train" else bundle.test_y
    keep = torch.nonzero(attack.test_mask(y_all)).flatten()
    g = torch.Generator().manual_seed(seed)
    pick = keep[torch.randperm(len(keep), generator=g)[:n].to(keep.device)]
    x = to_float(x_all[pick])
    triggered = torch.cat([attack.apply(x[i:i + 512]) for i in range(0, len(x), 512)])
    y_true = y_all[pick]
    return triggered, attack.target_labels(y_true, bundle.num_classes), y_true


def asr_under(model: nn.Module, result: "AttackResult", delta: torch.Tensor | None = None,
              batch_size: int = 1024) -> float:
    """ASR of ``model`` on the attacked setting's poisoned test set (BackdoorBench's: the
    non-target test images) with ``delta`` added on top of the trigger."""
    attack, bundle = result.attack, result.data
    if attack is None:
        raise ValueError("ASR needs an attacked setting")
    keep = attack.test_mask(bundle.test_y)
    x, y = bundle.test_x[keep], bundle.test_y[keep]
    d = None if delta is None else delta.to(bundle.device)
    pred = predict(model, x, batch_size, transform=lambda xb: apply_delta(attack.apply(xb), d))
    return accuracy(pred, attack.target_labels(y, bundle.num_classes))


__all__ = ["BUDGETS", "Budget", "NORMS", "budget", "check_budget", "project", "budget_of", "apply_delta", "poisoned_samples", "asr_under"]
