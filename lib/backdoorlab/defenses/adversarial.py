"""Adversarial perturbations shared by the unlearning defenses (i-BAU, SAU); not a defense.

- :func:`project` keeps a perturbation in an L2 or L-infinity ball (per sample, or one
  ball for a universal perturbation of shape ``[1, C, H, W]``).
- :func:`pgd` runs projected gradient steps on a perturbation to *maximise* an
  objective: signed steps (PGD-L-infinity, SAU) or plain gradient steps (i-BAU's
  universal perturbation, which BackdoorBench optimises with SGD).
- :func:`universal_perturbation` is i-BAU's inner maximisation: one perturbation for
  all images, one ascent step per clean batch over a pass of the defender's data.

Perturbations live in pixel space (the models normalise their own [0, 1] inputs);
perturbed images are not clipped to [0, 1], as in BackdoorBench's i-BAU and SAU.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..data.bundle import TensorBundle
from . import tools

NORMS = ("l2", "linf")
STEPS = ("sign", "grad")


def check_norm(norm: str, eps: float | None) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid choices: {', '.join(NORMS)}")
    if eps is not None and eps <= 0:
        raise ValueError(f"perturbation bound eps must be > 0 (or None for unbounded), got {eps}")


def project(delta: torch.Tensor, norm: str, eps: float | None) -> torch.Tensor:
    """``delta`` (``[N, C, H, W]``) projected onto the ``norm`` ball of radius ``eps``,
    each of the N perturbations separately; ``eps=None`` leaves it unbounded."""
    check_norm(norm, eps)
    if eps is None:
        return delta
    if norm == "linf":
        return delta.clamp(-eps, eps)
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (delta.dim() - 1)))
    return delta * (eps / norms).clamp(max=1.0)


def pgd(objective: Callable[[torch.Tensor], torch.Tensor], delta: torch.Tensor, *, steps: int, step_size: float,
        norm: str = "linf", eps: float | None = None, step: str = "sign") -> torch.Tensor:
    """``steps`` projected ascent steps on ``objective(delta)`` (a scalar to maximise)
    from ``delta``; returns the detached perturbation. Only ``delta`` gets gradients
    (model parameters are left untouched)."""
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; valid choices: {', '.join(STEPS)}")
    delta = project(delta.detach(), norm, eps)
    for _ in range(steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(objective(delta), delta)
        with torch.no_grad():
            delta = delta + step_size * (grad.sign() if step == "sign" else grad)
            delta = project(delta, norm, eps)
    return delta.detach()


def universal_perturbation(model: nn.Module, clean: TensorBundle, *, batch_size: int, generator: torch.Generator,
                           lr: float = 10.0, reg: float = 1e-3, norm: str = "l2", eps: float | None = None,
                           passes: int = 1) -> torch.Tensor:
    """i-BAU's inner maximisation: one perturbation ``[1, C, H, W]`` that raises the
    cross-entropy of ``model`` (in eval mode) w.r.t. its own clean predictions on every
    clean batch, minus an L2 penalty ``reg * ||delta||^2``; one gradient step of size
    ``lr`` per batch (BackdoorBench: SGD lr 10, penalty 1e-3, one pass, no bound)."""
    was_training = model.training
    model.eval()
    delta = torch.zeros(1, *clean.shape, device=clean.device)
    for _ in range(passes):
        for x, _y in tools.batches(clean, batch_size, generator):
            with torch.no_grad():
                pred = model(x).argmax(1)

            def objective(d: torch.Tensor, x=x, pred=pred) -> torch.Tensor:
                return F.cross_entropy(model(x + d).float(), pred) - reg * d.pow(2).sum()

            delta = pgd(objective, delta, steps=1, step_size=lr, norm=norm, eps=eps, step="grad")
    model.train(was_training)
    return delta
