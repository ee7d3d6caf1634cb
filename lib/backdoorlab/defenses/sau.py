"""SAU: Shared Adversarial Unlearning (Wei et al., NeurIPS 2023, "Shared Adversarial
Unlearning: Backdoor Mitigation by Unlearning Shared Adversarial Examples",
https://arxiv.org/abs/2307.10562).

Threat model: the defender holds the trained (possibly backdoored) model and a small
clean subset (5% in BackdoorBench); no trigger knowledge, no poisoned samples.

The backdoor risk is bounded by the risk on *shared adversarial examples* (SAEs):
perturbed inputs that both the backdoored model ``h_bd`` (a frozen copy) and the model
being purified ``h`` misclassify *to the same class*. Per clean batch:

1. maximisation (PGD-L-inf, ``adv_steps`` signed steps of ``adv_lr`` in a ball of radius
   ``trigger_norm``, started at the corner ``+trigger_norm``; one perturbation per image,
   shared by the two models) of ``beta1 * L_adv - beta2 * L_share``: ``L_adv`` is the
   cross-entropy of each model on the samples it does not yet misclassify (w.r.t. its
   own clean prediction), averaged over the two models; ``L_share`` is the Jensen-Shannon
   divergence between the two models' predictions on the samples that are not yet a
   shared adversarial example;
2. minimisation (one ``train.fit`` step): ``lmd1 * CE(h(x), y) + lmd2 * CE(h(x_adv), y)
   + lmd3 * L_sar`` where ``L_sar = -log(1 - p_h(x_adv)[y_bd])`` on the samples whose
   adversarial label under ``h_bd`` (``y_bd``) differs from both the true label and
   ``h_bd``'s clean prediction (summed, divided by the batch size): ``h`` unlearns by
   *not* agreeing with the backdoored model on its adversarial examples.

BN layers stay in eval mode during the defense (BackdoorBench's ``train_mode False``).

Hyperparameters (BackdoorBench ``config/defense/sau``): ratio 0.05; ``n_rounds`` 100
epochs over the clean data (the scale preset's defense epochs below ``paper``);
``trigger_norm`` 0.2, ``adv_lr`` 0.2, ``adv_steps`` 5, init ``max``, L-inf;
``beta1`` 0.01, ``beta2`` 1; ``lmd1`` 1, ``lmd2`` 0, ``lmd3`` 1; outer_steps 1;
Adam lr 1e-4.

The minimisation goes through ``train.fit`` with BackdoorBench's Adam lr 1e-4 (wd 0,
our trainer's cosine schedule, no augmentation as BackdoorBench's SAU loader). With ``optimizer="sgd"``
the step must stay small: with BN in eval mode, SGD diverges (NaN) at lr 1e-2 even for
plain cross-entropy on the smoke model and collapses at 3e-3.

Deviations: ``outer_steps`` > 1 is not supported (fit takes one
step per batch); PGD runs all ``adv_steps`` (BackdoorBench stops early once every sample
is a shared adversarial example, where the gradient is zero and the steps change
nothing); perturbations live in pixel space, unclipped, like BackdoorBench's.

>>> purified = defenses.create("sau").purify(model, clean, scale="default")
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.bundle import TensorBundle
from ..models import clone
from ..train import OPTIMIZERS, fit
from . import register
from .adversarial import pgd
from .base import Defense

INITS = ("max", "min", "zero", "random")


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-sample Jensen-Shannon divergence between rows of two probability matrices."""
    p, q = p.clamp_min(1e-8), q.clamp_min(1e-8)
    m = 0.5 * (p + q)
    return 0.5 * (p * (p.log() - m.log())).sum(1) + 0.5 * (q * (q.log() - m.log())).sum(1)


def shared_adversarial_examples(model: nn.Module, reference: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                                eps: float, step_size: float, steps: int, beta1: float, beta2: float,
                                init: str = "max", generator: torch.Generator | None = None) -> torch.Tensor:
    """SAU's maximisation: per-image L-inf perturbations (returned, detached) that make
    ``model`` and ``reference`` both misclassify ``x`` and agree with each other."""
    with torch.no_grad():
        clean_pred = model(x).argmax(1)
        clean_pred_ref = reference(x).argmax(1)
    n = len(x)

    def objective(delta: torch.Tensor) -> torch.Tensor:
        logits, logits_ref = model(x + delta).float(), reference(x + delta).float()
        with torch.no_grad():
            pred, pred_ref = logits.argmax(1), logits_ref.argmax(1)
            fooled, fooled_ref = pred != clean_pred, pred_ref != clean_pred_ref
            shared = fooled & fooled_ref & (pred == pred_ref)
        adv = ((F.cross_entropy(logits, y, reduction="none") * ~fooled).sum()
               + (F.cross_entropy(logits_ref, y, reduction="none") * ~fooled_ref).sum()) / (2 * n)
        share = (js_divergence(logits.softmax(1), logits_ref.softmax(1)) * ~shared).sum() / n
        return beta1 * adv - beta2 * share

    if init == "max":
        delta = torch.full_like(x, eps)
    elif init == "min":
        delta = torch.full_like(x, -eps)
    elif init == "zero":
        delta = torch.zeros_like(x)
    else:  # BackdoorBench's "random" draws U(0, 1) and then projects
        delta = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return pgd(objective, delta, steps=steps, step_size=step_size, norm="linf", eps=eps, step="sign")


def shared_unlearning_loss(logits_adv: torch.Tensor, adv_label_ref: torch.Tensor, potential: torch.Tensor) -> torch.Tensor:
    """``L_sar``: -log(1 - p(adv_label_ref)) on the ``potential`` poison samples, summed
    and divided by the batch size. The two algebraically equal forms (with ``1 - p`` and
    with the mass of the other classes) are averaged, as BackdoorBench does for
    numerical stability; probabilities are clamped to [0.001, 0.999]."""
    prob = logits_adv.float().softmax(1)
    one_hot = F.one_hot(adv_label_ref, prob.shape[1]).to(prob.dtype)
    pos = (prob * one_hot).sum(1)
    neg = (prob * (1 - one_hot)).sum(1)
    term = -(torch.log(1e-6 + neg.clamp(max=0.999)) + torch.log(1 + 1e-6 - pos.clamp(min=0.001))) / 2
    return (term * potential).sum() / len(logits_adv)


@register("sau")
@dataclass
class SAU(Defense):
    n_rounds: int | None = None
    lr: float = 1e-4
    optimizer: str = "adam"
    batch_size: int | None = None
    trigger_norm: float = 0.2
    adv_lr: float = 0.2
    adv_steps: int = 5
    pgd_init: str = "max"
    beta1: float = 0.01
    beta2: float = 1.0
    lmd1: float = 1.0
    lmd2: float = 0.0
    lmd3: float = 1.0
    train_mode: bool = False

    name = "sau"

    def __post_init__(self) -> None:
        if self.n_rounds is not None and self.n_rounds < 1:
            raise ValueError(f"n_rounds must be >= 1 (or None for the scale preset), got {self.n_rounds}")
        for name in ("lr", "trigger_norm", "adv_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.adv_steps < 1:
            raise ValueError(f"adv_steps must be >= 1, got {self.adv_steps}")
        if self.pgd_init not in INITS:
            raise ValueError(f"unknown pgd_init {self.pgd_init!r}; valid choices: {', '.join(INITS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; valid choices: {', '.join(OPTIMIZERS)}")
        for name in ("beta1", "beta2", "lmd1", "lmd2", "lmd3"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def loss_fn(self, reference: nn.Module, generator: torch.Generator):
        """The unlearning objective for ``fit``; builds the SAEs of each batch inside."""

        def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            model.eval()
            delta = shared_adversarial_examples(model, reference, x, y, eps=self.trigger_norm, step_size=self.adv_lr,
                                                steps=self.adv_steps, beta1=self.beta1, beta2=self.beta2,
                                                init=self.pgd_init, generator=generator)
            x_adv = x + delta
            model.train(self.train_mode)
            logits, logits_adv = model(torch.cat([x, x_adv])).float().split(len(x))
            model.eval()
            with torch.no_grad():
                clean_pred_ref = reference(x).argmax(1)
                adv_label_ref = reference(x_adv).argmax(1)
                potential = (adv_label_ref != y) & (adv_label_ref != clean_pred_ref)
            total = (self.lmd1 * F.cross_entropy(logits, y) + self.lmd2 * F.cross_entropy(logits_adv, y)
                     + self.lmd3 * shared_unlearning_loss(logits_adv, adv_label_ref, potential))
            return total, logits

        return loss

    def purify(self, model: nn.Module, clean: TensorBundle, *, scale=None, seed: int = 0,
               progress: bool = True) -> nn.Module:
        purified = clone(model)
        reference = clone(model).eval().requires_grad_(False)
        recipe = self.recipe(scale, self.n_rounds, self.lr, self.batch_size, augment=False, optimizer=self.optimizer,
                             weight_decay=0.0)
        gen = torch.Generator(device=clean.device).manual_seed(seed)
        fit(purified, clean, recipe, seed=seed, loss_fn=self.loss_fn(reference, gen), progress=progress, desc="sau")
        purified.eval()
        return purified


__all__ = ["SAU", "js_divergence", "shared_adversarial_examples", "shared_unlearning_loss"]
