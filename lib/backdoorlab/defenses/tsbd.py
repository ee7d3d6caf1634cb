"""TSBD: Two-Stage Backdoor Defense.

Lin, Liu, Wei, Li & Xiong, "Unveiling and Mitigating Backdoor Vulnerabilities based on
Unlearning Weight Changes and Backdoor Activeness", NeurIPS 2024,
https://arxiv.org/abs/2405.20291 (official code: ``linweiii/TSBD``, a BackdoorBench plug-in).

Threat model: the defender holds the trained (possibly backdoored) model and a small
clean subset of the training distribution (5% in the paper); no trigger knowledge, no
poisoned samples.

Method (as the official ``tsbd.py`` implements it):

1. *Clean unlearning* (:func:`clean_unlearn`): gradient ascent on the clean cross-entropy
   (SGD lr 1e-4, momentum 0.9, no weight decay, BatchNorm in train mode, training
   augmentation) until the accuracy on the clean data (eval mode) is ``<= 10%``, at most
   1000 epochs. Observation 1: the neurons whose weights change most during *clean*
   unlearning are the ones that change most during *poison* unlearning (the backdoor
   neurons); the same function unlearns a bundle of poisoned images with target labels
   (stop at ASR ``<= 5%``). Observation 2: ``record_layer`` logs the per-neuron L1 norm of
   the weight gradient during the first unlearning epoch.
2. *Neuron weight change* (:func:`neuron_weight_change`): NWC of an output channel of
   every ``nn.Conv2d`` (shortcut convs excluded) = L1 norm of its weight difference
   between the unlearned and the original model.
3. *Zero reinitialisation* (:func:`zero_reinit`): rank all neurons globally by NWC, take
   the top ``int(total * n)``; pool the per-weight ``|delta|`` of those neurons and set
   the top ``m`` fraction of the pool (every weight with ``|delta| >=`` the pool's
   threshold) to zero, in a copy of the *original* backdoored model. BN and linear layers
   are untouched.
4. *Activeness-aware fine-tuning* (:func:`activeness_aware_loss`), on the clean data,
   per batch: ``g1 = grad CE(theta)``; ``theta' = theta + r * g1 / ||g1||``;
   ``g2 = grad CE(theta')``; step with ``(1 - alpha) g1 + alpha g2`` (SGD lr 0.01,
   momentum 0.9, no weight decay, constant lr, 21 epochs). This is the finite-difference
   form of the paper's gradient-norm penalty ``L_ce + lambda ||grad L_ce||`` with
   ``lambda = alpha * r``: it keeps the repaired model in a flat region where the
   backdoor is hard to re-activate. ``alpha=0`` gives the paper's Vanilla-FT ablation,
   ``ft_epochs=0`` its No-FT ablation (Table 4).

Hyperparameters (``tsbd/config.yaml``): ``m_ratio`` 0.7, ``r`` 0.05, ``alpha`` 0.7,
``lr_unlearn`` 1e-4, ``lr_ft`` 0.01, batch 256 (both stages), 1000 unlearning epochs at
most, ``acc_threshold`` 0.10, ``ft_epoch`` 20 (the loop runs ``range(ft_epoch + 1)`` = 21
epochs). The neuron ratio ``n`` is swept over ``NEURON_RATIOS`` in the code, which never
picks one (the value behind the paper's tables is not public). Here ``n_ratio=None``
chooses it with a clean-data rule: the *largest* ratio of ``neuron_ratios`` (tried in
increasing order, stopping at the first failure) whose zero-reinitialised model, before
fine-tuning, keeps the accuracy on the defender's clean data within a relative
``acc_drop`` (0.1) of the original model's (``tools.largest_within_drop``); if none does,
the smallest ratio. A given ``n_ratio`` is used as is.

Scales: ``batch_size=None`` takes the preset's defense batch (256 at ``paper``);
``ft_epochs=None`` 21 at ``paper`` and the preset's defense epochs below it;
``max_unlearn_epochs=None`` 1000 at ``paper`` and 300 below it (measured: lr 1e-4 reaches
10% clean accuracy after about 110 epochs on the 100 smoke digits and 34 on the 200
default ones, so the cap is not hit; if it is, ``unlearn_reached_`` is False and TSBD goes
on with the model it has).

Measured (mnist5k BadNets, CPU, seed 0): on the ``make test`` smoke model the rule picks n 0.05
(clean accuracy 0.94 after zeroing at 0.01 and 0.05, 0.68 at 0.1) and TSBD gives ACC 0.636, ASR
0.663 (from 0.938, 0.998). At ``default`` zeroing collapses the defender's clean accuracy already
at n 0.01 (to 0.34), so the rule falls back to the smallest ratio, n 0.01, and stage 2 removes
the backdoor: ACC 0.946, ASR 0.001 (FT: 0.943, 0.001). (Measured before the clean subset was made
independent of the poisoned samples: at ``default`` n 0.01 and ACC 0.930, ASR 0.003; swept by
hand then, every n of ``NEURON_RATIOS`` ended with ASR <= 0.01 and ACC 0.84-0.94.)

Diagnostics after ``purify``: ``n_ratio_`` (the ratio used), ``selection_`` (the clean-rule
trace), ``unlearn_epochs_``, ``unlearn_acc_`` (clean accuracy after each unlearning epoch),
``unlearn_reached_``, ``nwc_`` (layer -> NWC per neuron), ``zeroed_`` (neurons selected,
weights zeroed).

Deviations from the official code:

- The perturbation is normalised per parameter tensor (``g / ||g||`` for each tensor) by
  default: the code's version, kept as the default because it is the algorithm behind the
  paper's numbers; ``norm="global"`` normalises by the norm of the whole gradient, as the
  paper's single-norm formulation reads.
- Stage 2 runs through ``train.fit``: its loss function computes ``g1`` and ``g2`` with
  ``torch.autograd.grad`` and returns a surrogate whose value is ``CE(theta)`` and whose
  gradient is ``(1 - alpha) g1 + alpha g2`` (see :func:`activeness_aware_loss`). The BN
  running statistics are updated once per batch (at ``theta``, before the step; the code
  updates them with one extra forward after the step). The clean data are shuffled each
  epoch (the code's fine-tuning loader is not shuffled).
- Unlearning runs one ``fit`` call per epoch (the stopping rule is checked between
  epochs), so SGD momentum restarts each epoch; the stopping accuracy is measured without
  augmentation (the code measures it on the augmented loader).
- Ranking uses the exact NWC (the code ranks values rounded to 4 decimals in ``nwc.txt``);
  ties keep layer and channel order, as there. A zero-norm gradient tensor is not
  perturbed (the code divides by zero).

>>> purified = defenses.create("tsbd").purify(model, clean, scale="default")
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import scales
from ..data.bundle import TensorBundle
from ..models import clone
from ..train import LossFn, Recipe, fit, progress_bar
from . import register, tools
from .base import Defense
from .masking import check_range

NEURON_RATIOS = (0.01, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 0.9)  # the code's sweep of n
NORMS = ("tensor", "global")
PAPER_FT_EPOCHS = 21  # ft_epoch 20, run as range(ft_epoch + 1)
PAPER_MAX_UNLEARN_EPOCHS = 1000
MAX_UNLEARN_EPOCHS_BELOW_PAPER = 300


# ----------------------------------------------------------------------------- stage 1a

@dataclass
class Unlearning:
    """What :func:`clean_unlearn` returns: the unlearned copy, the number of epochs run,
    the accuracy on the unlearned data (eval mode) after each epoch, whether the threshold
    was reached, and (with ``record_layer``) the per-neuron L1 gradient norm of that layer
    averaged over the batches of the first epoch."""

    model: nn.Module
    epochs: int
    accuracy: list[float]
    reached: bool
    grad_norm: torch.Tensor | None = None


def negated_cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient *ascent* on the cross-entropy (TSBD's unlearning step)."""
    logits = model(x)
    return -F.cross_entropy(logits.float(), y), logits


def _conv_weight(model: nn.Module, name: str) -> nn.Parameter:
    name = name.removesuffix(".weight")
    module = dict(model.named_modules()).get(name)
    if not isinstance(module, nn.Conv2d):
        raise ValueError(f"record_layer {name!r} is not an nn.Conv2d of {type(model).__name__}; valid choices: "
                         f"{', '.join(tools.layers(model, nn.Conv2d))}")
    return module.weight


def clean_unlearn(model: nn.Module, data: TensorBundle, *, lr: float = 1e-4, max_epochs: int,
                  acc_threshold: float = 0.10, batch_size: int, seed: int = 0, record_layer: str | None = None,
                  progress: bool = True) -> Unlearning:
    """Gradient ascent on the cross-entropy of ``data.train_x``/``train_y`` in a copy of
    ``model`` (SGD lr ``lr``, momentum 0.9, no weight decay, BN in train mode, training
    augmentation; one ``fit`` call per epoch), stopping after the first epoch whose
    accuracy on that data in eval mode is ``<= acc_threshold``, or after ``max_epochs``.

    Clean unlearning passes the clean subset and 0.10; *poison* unlearning (Observation 1)
    passes a bundle of poisoned images with the target label and 0.05 (the accuracy is
    then the ASR). ``record_layer`` (e.g. ``"layer4.1.conv2"``) records the per-neuron
    (output-channel) L1 norm of that conv's weight gradient, averaged over the first
    epoch's batches (Observation 2)."""
    if max_epochs < 1 or batch_size < 2:
        raise ValueError(f"max_epochs must be >= 1 and batch_size >= 2, got {max_epochs}, {batch_size}")
    check_range("lr", lr, 0, float("inf"), low_open=True)
    check_range("acc_threshold", acc_threshold, 0, 1)
    unlearned = clone(model)
    recipe = Recipe(epochs=1, batch_size=batch_size, lr=lr, momentum=0.9, weight_decay=0.0, schedule="constant")
    record: dict[str, Any] = {"sum": None, "batches": 0}
    handle = None
    if record_layer is not None:
        weight = _conv_weight(unlearned, record_layer)

        def hook(grad: torch.Tensor) -> None:  # per batch of the first epoch, on the device (no sync)
            norms = grad.detach().float().flatten(1).abs().sum(1)
            record["sum"] = norms if record["sum"] is None else record["sum"] + norms
            record["batches"] += 1

        handle = weight.register_hook(hook)
    accuracy: list[float] = []
    with progress_bar(max_epochs, "tsbd unlearn", progress) as bar:
        for epoch in range(max_epochs):
            fit(unlearned, data, recipe, seed=seed + epoch, loss_fn=negated_cross_entropy, progress=False,
                desc="tsbd unlearn")
            if handle is not None:
                handle.remove()
                handle = None
            accuracy.append(tools.accuracy(unlearned, data))
            bar.update(1)
            bar.set_postfix(acc=f"{accuracy[-1]:.3f}")
            if accuracy[-1] <= acc_threshold:
                break
    grad_norm = record["sum"] / record["batches"] if record["sum"] is not None else None
    return Unlearning(unlearned.eval(), len(accuracy), accuracy, accuracy[-1] <= acc_threshold, grad_norm)


# ----------------------------------------------------------------------------- stage 1b, 1c

def _state(model: nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    return model if isinstance(model, Mapping) else model.state_dict()


def weight_changes(before: nn.Module, after: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``|after - before|`` of the weight of every ``nn.Conv2d`` of ``before`` whose name
    lacks "shortcut" (``after``: a model or a state dict with the same names)."""
    state = _state(after)
    out = {}
    for name, conv in tools.layers(before, nn.Conv2d).items():
        key = f"{name}.weight"
        if key not in state or state[key].shape != conv.weight.shape:
            raise ValueError(f"after has no weight {key!r} of shape {tuple(conv.weight.shape)}: "
                             "before and after must be the same architecture")
        out[name] = (state[key].detach().to(conv.weight.device).float() - conv.weight.detach().float()).abs()
    if not out:
        raise ValueError(f"{type(before).__name__} has no nn.Conv2d (outside shortcuts) to compare")
    return out


def neuron_weight_change(before: nn.Module, after: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NWC: per output channel, the L1 norm of the weight difference, for every
    ``nn.Conv2d`` whose name lacks "shortcut" (layer name -> ``float[out_channels]``)."""
    return {name: delta.flatten(1).sum(1) for name, delta in weight_changes(before, after).items()}


def top_neurons(nwc: Mapping[str, torch.Tensor], n_ratio: float) -> dict[str, torch.Tensor]:
    """The global top ``int(total * n_ratio)`` neurons by NWC, ranked across all layers
    (ties keep layer, then channel, order): layer name -> bool mask over its channels."""
    check_range("n_ratio", n_ratio, 0, 1)
    names = list(nwc)
    scores = torch.cat([nwc[name].float().cpu() for name in names])
    k = int(len(scores) * n_ratio)
    chosen = torch.zeros(len(scores), dtype=torch.bool)
    chosen[torch.sort(scores, descending=True, stable=True).indices[:k]] = True
    out, start = {}, 0
    for name in names:
        size = len(nwc[name])
        out[name] = chosen[start:start + size].to(nwc[name].device)
        start += size
    return out


@torch.no_grad()
def zero_reinit(model: nn.Module, before: nn.Module, after: nn.Module | Mapping[str, torch.Tensor], n_ratio: float,
                m_ratio: float) -> nn.Module:
    """A copy of ``model`` (the ORIGINAL backdoored model; normally ``before`` itself) in
    which, among the global top ``int(total_neurons * n_ratio)`` neurons by NWC between
    ``before`` and ``after``, the top ``m_ratio`` fraction of their pooled per-weight
    ``|delta|`` is set to zero (every selected neuron's weight with ``|delta| >=`` the
    ``int(pool * m_ratio)``-th largest value). BN and linear layers are untouched."""
    check_range("n_ratio", n_ratio, 0, 1)
    check_range("m_ratio", m_ratio, 0, 1)
    deltas = weight_changes(before, after)
    selected = top_neurons({name: d.flatten(1).sum(1) for name, d in deltas.items()}, n_ratio)
    out = clone(model)
    convs = tools.layers(out, nn.Conv2d)
    if set(convs) != set(deltas):
        raise ValueError("model and before must have the same conv layers")
    pool = torch.cat([deltas[name][selected[name]].flatten() for name in deltas])
    count = int(len(pool) * m_ratio)
    if count == 0:
        return out
    threshold = torch.topk(pool, count).values[-1]
    for name, delta in deltas.items():
        zero = selected[name].view(-1, 1, 1, 1) & (delta >= threshold)
        convs[name].weight[zero.to(convs[name].weight.device)] = 0
    return out


# ----------------------------------------------------------------------------- stage 2

def _bn_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]


def activeness_aware_loss(r: float = 0.05, alpha: float = 0.7, norm: str = "tensor") -> LossFn:
    """TSBD's stage-2 objective as a ``train.fit`` loss function.

    Per batch: ``g1 = grad CE(theta)`` (autograd); the parameters move in place (no grad)
    to ``theta' = theta + r * g1 / ||g1||`` (norm per parameter tensor, or of the whole
    gradient with ``norm="global"``); ``g2 = grad CE(theta')``; the parameters and the BN
    running statistics go back to ``theta`` (so they update once per batch). The returned
    surrogate is ``CE(theta).detach() + S - S.detach()`` with
    ``S = sum_p <p, ((1 - alpha) g1 + alpha g2).detach()>``: its value is ``CE(theta)``
    (what ``fit`` logs) and its gradient w.r.t. each parameter is exactly
    ``(1 - alpha) g1 + alpha g2``, which ``fit``'s optimiser then steps on."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid choices: {', '.join(NORMS)}")
    check_range("r", r, 0, float("inf"))
    check_range("alpha", alpha, 0, 1)

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        params = [p for p in model.parameters() if p.requires_grad]
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        g1 = [g if g is not None else torch.zeros_like(p)
              for p, g in zip(params, torch.autograd.grad(loss, params, allow_unused=True))]
        with torch.no_grad():
            if norm == "tensor":
                steps = [g * (r / g.norm()) if r > 0 else torch.zeros_like(g) for g in g1]
                steps = [torch.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0) for s in steps]  # zero-norm tensors
            else:
                total = torch.linalg.vector_norm(torch.stack([g.norm() for g in g1])).clamp_min(1e-12)
                steps = [g * (r / total) for g in g1]
            saved = [p.detach().clone() for p in params]  # restored exactly ((p + s) - s need not be p)
            stats = [b.clone() for b in _bn_buffers(model)]
            for p, s in zip(params, steps):
                p.add_(s)
        loss2 = F.cross_entropy(model(x).float(), y)
        g2 = [g if g is not None else torch.zeros_like(p)
              for p, g in zip(params, torch.autograd.grad(loss2, params, allow_unused=True))]
        with torch.no_grad():
            for p, theta in zip(params, saved):
                p.copy_(theta)
            for b, saved in zip(_bn_buffers(model), stats):
                b.copy_(saved)
        linear = sum((p * ((1 - alpha) * a + alpha * b)).sum() for p, a, b in zip(params, g1, g2))
        return loss.detach() + linear - linear.detach(), logits.detach()

    return loss_fn


def activeness_aware_finetune(model: nn.Module, data: TensorBundle, recipe: Recipe, *, r: float = 0.05,
                              alpha: float = 0.7, norm: str = "tensor", seed: int = 0, progress: bool = True):
    """Stage 2 in place on ``model`` through ``train.fit``; returns fit's history."""
    return fit(model, data, recipe, seed=seed, loss_fn=activeness_aware_loss(r, alpha, norm), progress=progress,
               desc="tsbd finetune")


# ----------------------------------------------------------------------------- the defense

@register("tsbd")
@dataclass
class TSBD(Defense):
    n_ratio: float | None = None
    m_ratio: float = 0.7
    r: float = 0.05
    alpha: float = 0.7
    lr_unlearn: float = 1e-4
    lr_ft: float = 0.01
    acc_threshold: float = 0.10
    max_unlearn_epochs: int | None = None
    batch_size: int | None = None
    ft_epochs: int | None = None
    norm: str = "tensor"
    acc_drop: float = 0.1
    neuron_ratios: tuple[float, ...] = NEURON_RATIOS

    n_ratio_: float | None = field(init=False, default=None)
    selection_: list[dict] = field(init=False, default_factory=list, repr=False)
    unlearn_epochs_: int | None = field(init=False, default=None)
    unlearn_acc_: list[float] = field(init=False, default_factory=list, repr=False)
    unlearn_reached_: bool | None = field(init=False, default=None)
    nwc_: dict[str, torch.Tensor] = field(init=False, default_factory=dict, repr=False)
    zeroed_: dict[str, int] = field(init=False, default_factory=dict, repr=False)

    name = "tsbd"

    def __post_init__(self) -> None:
        if self.n_ratio is not None:
            check_range("n_ratio", self.n_ratio, 0, 1, low_open=True)
        check_range("m_ratio", self.m_ratio, 0, 1, low_open=True)
        check_range("r", self.r, 0, float("inf"))
        check_range("alpha", self.alpha, 0, 1)
        check_range("lr_unlearn", self.lr_unlearn, 0, float("inf"), low_open=True)
        check_range("lr_ft", self.lr_ft, 0, float("inf"), low_open=True)
        check_range("acc_threshold", self.acc_threshold, 0, 1)
        check_range("acc_drop", self.acc_drop, 0, 1)
        if self.max_unlearn_epochs is not None and self.max_unlearn_epochs < 1:
            raise ValueError(f"max_unlearn_epochs must be >= 1, got {self.max_unlearn_epochs}")
        if self.batch_size is not None and self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {self.batch_size}")
        if self.ft_epochs is not None and self.ft_epochs < 0:
            raise ValueError(f"ft_epochs must be >= 0 (0: no fine-tuning), got {self.ft_epochs}")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; valid choices: {', '.join(NORMS)}")
        if isinstance(self.neuron_ratios, (str, bytes)) or not isinstance(self.neuron_ratios, Sequence) \
                or not self.neuron_ratios:
            raise ValueError(f"neuron_ratios must be a non-empty sequence of ratios in (0, 1], got "
                             f"{self.neuron_ratios!r}")
        for ratio in self.neuron_ratios:
            check_range("every neuron_ratios entry", ratio, 0, 1, low_open=True)
        self.neuron_ratios = tuple(sorted(float(v) for v in self.neuron_ratios))

    def settings(self, scale: Any) -> tuple[int, int, int]:
        """(batch size, maximum unlearning epochs, fine-tuning epochs) at ``scale``."""
        preset = scales.get(scale)
        paper = preset.name == "paper"
        batch = self.batch_size or preset.defense_batch_size
        cap = self.max_unlearn_epochs or (PAPER_MAX_UNLEARN_EPOCHS if paper else MAX_UNLEARN_EPOCHS_BELOW_PAPER)
        ft = self.ft_epochs if self.ft_epochs is not None else (PAPER_FT_EPOCHS if paper else preset.defense_epochs)
        return batch, cap, ft

    def purify(self, model: nn.Module, clean: TensorBundle, *, scale=None, seed: int = 0,
               progress: bool = True) -> nn.Module:
        batch_size, cap, ft_epochs = self.settings(scale)
        original = clone(model).to(clean.device).eval()
        # stage 1: unlearn, measure NWC, zero-reinitialise the original model
        unlearning = clean_unlearn(original, clean, lr=self.lr_unlearn, max_epochs=cap,
                                   acc_threshold=self.acc_threshold, batch_size=batch_size, seed=seed,
                                   progress=progress)
        self.unlearn_epochs_, self.unlearn_acc_ = unlearning.epochs, unlearning.accuracy
        self.unlearn_reached_ = unlearning.reached
        after = unlearning.model.state_dict()
        self.nwc_ = {k: v.cpu() for k, v in neuron_weight_change(original, after).items()}

        def candidate(n: float) -> nn.Module:
            return zero_reinit(original, original, after, n, self.m_ratio)

        if self.n_ratio is not None:
            purified, self.n_ratio_, self.selection_ = candidate(self.n_ratio), self.n_ratio, []
        else:
            purified, self.n_ratio_, self.selection_ = tools.largest_within_drop(
                self.neuron_ratios, candidate, clean, tools.accuracy(original, clean), self.acc_drop)
        selected = top_neurons(self.nwc_, self.n_ratio_)
        weights = dict(original.named_parameters())
        self.zeroed_ = {"neurons": int(sum(int(v.sum()) for v in selected.values())),
                        "weights": int(sum(int(((p == 0) & (weights[n] != 0)).sum())
                                           for n, p in purified.named_parameters()))}
        # stage 2: activeness-aware fine-tuning
        if ft_epochs > 0:
            recipe = Recipe(epochs=ft_epochs, batch_size=batch_size, lr=self.lr_ft, momentum=0.9,
                            weight_decay=0.0, schedule="constant")
            activeness_aware_finetune(purified, clean, recipe, r=self.r, alpha=self.alpha, norm=self.norm,
                                      seed=seed, progress=progress)
        return purified.eval()


__all__ = ["TSBD", "Unlearning", "NEURON_RATIOS", "NORMS", "clean_unlearn", "negated_cross_entropy",
           "weight_changes", "neuron_weight_change", "top_neurons", "zero_reinit", "activeness_aware_loss",
           "activeness_aware_finetune"]
