"""NC: Neural Cleanse (Wang, Yao, Shan, Li, Viswanath, Zheng & Zhao, IEEE S&P 2019, "Neural
Cleanse: Identifying and Mitigating Backdoor Attacks in Neural Networks",
https://people.cs.uchicago.edu/~ravenben/publications/pdf/backdoor-sp19.pdf).

Threat model: the defender holds the trained (possibly backdoored) model and a small
clean subset of the training distribution; no trigger knowledge, no poisoned samples.

1. Reverse engineering. For every class ``k`` find the smallest trigger -- a mask
   ``m_k`` [1, H, W] and a pattern ``p_k`` [C, H, W], both tanh-parameterised into [0, 1]
   -- that sends clean images to ``k``: minimise ``CE(f((1 - m) x + m p), k) + cost_k |m|_1``
   with Adam (lr 0.1, betas (0.5, 0.9)) over the clean data. All classes are optimised at
   once: a [K, 1, H, W] mask tensor, one batched forward of the K stamped copies of each
   batch (Adam is element-wise, so this equals K independent runs). ``cost_k`` follows
   NC's dynamic schedule: start at ``init_cost``; after ``patience`` epochs in a row with
   attack success >= ``attack_succ_threshold`` multiply it by ``cost_multiplier``, after
   ``patience`` epochs below divide it; keep the smallest-norm mask that reached the
   threshold; stop a class early once its cost went both up and down and its best norm
   stopped improving for ``early_stop_patience`` epochs.
2. Detection. Anomaly index of class ``k`` = |median(norms) - norm_k| / (1.4826 x MAD)
   (MAD = median absolute deviation of the L1 norms); classes with index > ``threshold``
   (2) whose norm is *below* the median are flagged. No flagged class: the model is
   returned unchanged (a clone), as NC prescribes.
3. Mitigation. ``"unlearn"`` (default, as BackdoorBench, issue #11): fine-tune on the
   clean data where ``unlearn_ratio`` (20%) of the samples carry the reversed trigger of a
   flagged class but keep their true labels. ``"prune"``: zero the last-conv-block channels
   (the classifier's pooled input features) whose mean activation changes most (in absolute
   value: PreAct-ResNet's pooled features are signed, there is no ReLU before the pooling,
   and the trigger drives some channels strongly negative) under the reversed triggers, as
   many as keep the clean accuracy within ``acc_ratio`` (the clean-data rule of FP, steps of
   ``once_prune_ratio`` x channels); no fine-tuning.

Hyperparameters: NC / BackdoorBench ``init_cost`` 1e-3, Adam lr 0.1 betas (0.5, 0.9),
batch 32, ``attack_succ_threshold`` 0.99, ``patience`` 5, ``cost_multiplier`` 1.5
(BackdoorBench; NC's code uses 2 up / 2**1.5 down), ``early_stop_patience`` 5 x patience,
early-stop threshold 0.99, anomaly ``threshold`` 2; unlearning ``unlearn_ratio`` 0.2, SGD lr
0.01 (momentum 0.9, wd 5e-4, cosine) for the preset's defense epochs and batch size.
``re_epochs`` (passes over the clean data while reverse engineering) and ``re_batch_size``
left as ``None`` take the scale's budget in ``RE_BUDGET``: ``paper`` 100 passes of batch 32
(NC's batch; its code allows up to 1000 passes over 1000 images, with early stopping),
``default`` and ``smoke`` 30 x 8 (their clean subsets have 200 and 100 images: batch 8 gives
25 and 13 steps a pass, as FT's preset uses small batches on small clean sets; the outlier
needs ~250-400 Adam steps to separate from the other classes' norms. At ``default`` with
batch 32, 210 steps, no class was flagged on BadNets; with batch 8, class 0 is flagged,
anomaly index 2.2, and unlearning takes ASR 1.0 -> 0.001).

Deviations: the cost starts at ``init_cost`` (NC's code can start at 0 and set it once the
attack succeeds); classes that never reach the success threshold keep their last mask
(norm still recorded; ``report["reached"]`` says which); the reverse-engineering batch is 8
at ``smoke`` (above); unlearning stamps the chosen 20% once into a copy of the clean bundle
(uint8), so the trainer's crop augmentation moves the reversed trigger with the image, as it
moved the real trigger during the attack; ``"prune"`` zeroes the Linear layer's input
columns (the pooled channels, as in FP) rather than a conv layer's output channels, which
PreAct-ResNet's residual sum would bypass; no test-set model selection.

After ``purify`` the object's ``report`` holds ``norms`` (L1 norm per class),
``anomaly_index`` (per class), ``flagged`` (class indices), ``reached``, ``costs``,
``epochs_run``, ``mitigation`` and, for ``"prune"``, the pruned channels and accuracy
trace; ``report["masks"]`` / ``report["patterns"]`` hold the reversed triggers ([K,1,H,W] /
[K,C,H,W], on the CPU).

>>> nc = defenses.create("nc"); purified = nc.purify(model, clean, scale="default"); nc.report["flagged"]
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import scales
from ..data.bundle import TensorBundle, to_float
from ..models import clone
from ..train import autocast, fit
from . import register, tools
from .base import Defense
from .fp import last_linear, prune_levels

MITIGATIONS = ("unlearn", "prune")
# reverse-engineering budget per scale: (passes over the clean data, batch size)
RE_BUDGET = {"smoke": (30, 8), "default": (30, 8), "paper": (100, 32)}
MAD_CONSISTENCY = 1.4826
EPS = 1e-7


def squash(t: torch.Tensor) -> torch.Tensor:
    """NC's tanh parameterisation: R -> (0, 1)."""
    return (torch.tanh(t) / (2 - EPS) + 0.5).clamp(0, 1)  # clamp: float32 rounding at saturation


def unsquash(v: torch.Tensor) -> torch.Tensor:
    return torch.atanh(((v - 0.5) * (2 - EPS)).clamp(-1 + 1e-6, 1 - 1e-6))


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """(1 - m) x + m p for images ``x`` [B, C, H, W] in [0, 1]."""
    return (1 - mask) * x + mask * pattern


def anomaly_index(norms: torch.Tensor) -> torch.Tensor:
    """MAD-based anomaly index |median - norm_k| / (1.4826 x MAD) per class (np.median semantics)."""
    norms = norms.double()
    median = torch.quantile(norms, 0.5)
    mad = torch.quantile((norms - median).abs(), 0.5)
    return ((norms - median).abs() / (MAD_CONSISTENCY * mad).clamp_min(1e-12)).float()


def flag(norms: torch.Tensor, threshold: float = 2.0) -> torch.Tensor:
    """Indices of classes whose anomaly index exceeds ``threshold`` with a norm below the median."""
    below = norms.double() < torch.quantile(norms.double(), 0.5)
    return torch.nonzero((anomaly_index(norms) > threshold) & below).flatten()


@register("nc")
@dataclass
class NeuralCleanse(Defense):
    re_epochs: int | None = None
    re_lr: float = 0.1
    re_batch_size: int | None = None
    init_cost: float = 1e-3
    cost_multiplier: float = 1.5
    patience: int = 5
    attack_succ_threshold: float = 0.99
    early_stop_patience: int = 25
    early_stop_threshold: float = 0.99
    threshold: float = 2.0
    mitigation: str = "unlearn"
    unlearn_ratio: float = 0.2
    once_prune_ratio: float = 0.01
    acc_ratio: float = 0.1
    epochs: int | None = None
    lr: float = 0.01
    batch_size: int | None = None
    report: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    name = "nc"

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(self.re_epochs is None or self.re_epochs >= 1, f"re_epochs must be >= 1, got {self.re_epochs}")
        need(self.re_lr > 0, f"re_lr must be > 0, got {self.re_lr}")
        need(self.re_batch_size is None or self.re_batch_size >= 2,
             f"re_batch_size must be >= 2, got {self.re_batch_size}")
        need(self.init_cost >= 0, f"init_cost must be >= 0, got {self.init_cost}")
        need(self.cost_multiplier > 1, f"cost_multiplier must be > 1, got {self.cost_multiplier}")
        need(self.patience >= 1, f"patience must be >= 1, got {self.patience}")
        need(self.early_stop_patience >= 1, f"early_stop_patience must be >= 1, got {self.early_stop_patience}")
        need(0 < self.attack_succ_threshold <= 1,
             f"attack_succ_threshold must be in (0, 1], got {self.attack_succ_threshold}")
        need(0 < self.early_stop_threshold <= 1,
             f"early_stop_threshold must be in (0, 1], got {self.early_stop_threshold}")
        need(self.threshold > 0, f"threshold (anomaly index) must be > 0, got {self.threshold}")
        need(self.mitigation in MITIGATIONS,
             f"unknown mitigation {self.mitigation!r}; valid choices: {', '.join(MITIGATIONS)}")
        need(0 < self.unlearn_ratio <= 1, f"unlearn_ratio must be in (0, 1], got {self.unlearn_ratio}")
        need(0 < self.once_prune_ratio <= 1, f"once_prune_ratio must be in (0, 1], got {self.once_prune_ratio}")
        need(0 <= self.acc_ratio < 1, f"acc_ratio must be in [0, 1), got {self.acc_ratio}")
        need(self.epochs is None or self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.batch_size is None or self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")

    # -- 1. reverse engineering -------------------------------------------------------------
    def reverse_engineer(self, model: nn.Module, clean: TensorBundle, *, scale=None, seed: int = 0
                         ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Reversed triggers of every class: (masks [K,1,H,W], patterns [K,C,H,W], stats)."""
        preset = scales.get(scale)
        default_epochs, default_batch = RE_BUDGET.get(preset.name, RE_BUDGET["paper"])
        epochs, batch_size = self.re_epochs or default_epochs, self.re_batch_size or default_batch
        device = clean.device
        probe = clone(model).to(device).eval().requires_grad_(False)
        k, (c, h, w) = clean.num_classes, clean.shape
        gen = torch.Generator().manual_seed(seed)
        mask_t = unsquash(torch.rand(k, 1, h, w, generator=gen)).to(device).requires_grad_(True)
        pattern_t = unsquash(torch.rand(k, c, h, w, generator=gen)).to(device).requires_grad_(True)
        opt = torch.optim.Adam([mask_t, pattern_t], lr=self.re_lr, betas=(0.5, 0.9))
        targets = torch.arange(k, device=device)

        zeros = lambda dtype=torch.int64: torch.zeros(k, device=device, dtype=dtype)  # noqa: E731
        cost = torch.full((k,), float(self.init_cost), device=device)
        best_reg = torch.full((k,), float("inf"), device=device)
        best_mask, best_pattern = squash(mask_t.detach()).clone(), squash(pattern_t.detach()).clone()
        up_count, down_count, set_count, stop_count = zeros(), zeros(), zeros(), zeros()
        up_flag, down_flag = zeros(torch.bool), zeros(torch.bool)
        stop_best = torch.full((k,), float("inf"), device=device)
        active = torch.ones(k, device=device, dtype=torch.bool)
        order_gen = torch.Generator().manual_seed(seed)
        epochs_run = 0
        for _ in range(epochs):
            acc_sum = torch.zeros(k, device=device)
            reg_sum = torch.zeros(k, device=device)
            n_batches = 0
            for x, _y in tools.batches(clean, batch_size, order_gen):
                b = len(x)
                mask, pattern = squash(mask_t), squash(pattern_t)
                stamped = stamp(x[None], mask[:, None], pattern[:, None]).flatten(0, 1)  # [K*B, C, H, W]
                with autocast(device):
                    logits = probe(stamped)
                ce = F.cross_entropy(logits.float(), targets.repeat_interleave(b), reduction="none").view(k, b).mean(1)
                reg = mask.flatten(1).sum(1)  # L1 norm of each mask (values are >= 0)
                loss = ((ce + cost * reg) * active).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                acc_sum += (logits.detach().argmax(1).view(k, b) == targets[:, None]).float().mean(1)
                reg_sum += reg.detach()
                n_batches += 1
            epochs_run += 1
            acc, reg = acc_sum / n_batches, reg_sum / n_batches
            success = acc >= self.attack_succ_threshold

            # keep the smallest mask that reaches the success threshold
            better = success & (reg < best_reg) & active
            with torch.no_grad():
                best_mask[better] = squash(mask_t[better])
                best_pattern[better] = squash(pattern_t[better])
            best_reg = torch.where(better, reg, best_reg)

            # early stop (per class): the best norm stopped improving after the cost moved both ways
            found = torch.isfinite(best_reg)
            stalled = best_reg >= self.early_stop_threshold * stop_best
            stop_count = torch.where(found, torch.where(stalled, stop_count + 1, 0), stop_count)
            stop_best = torch.minimum(best_reg, stop_best)
            active &= ~(up_flag & down_flag & (stop_count >= self.early_stop_patience))

            # NC's dynamic cost schedule
            zero_cost = cost == 0
            set_count = torch.where(zero_cost & success, set_count + 1, 0)
            reset = set_count >= self.patience
            cost = torch.where(reset, torch.full_like(cost, self.init_cost), cost)
            up_count = torch.where(success & ~reset, up_count + 1, 0)
            down_count = torch.where(~success & ~reset, down_count + 1, 0)
            set_count = torch.where(reset, 0, set_count)
            go_up, go_down = up_count >= self.patience, down_count >= self.patience
            go_down &= ~go_up
            cost = torch.where(go_up & active, cost * self.cost_multiplier, cost)
            cost = torch.where(go_down & active, cost / self.cost_multiplier, cost)
            up_flag |= go_up & active
            down_flag |= go_down & active
            up_count = torch.where(go_up, 0, up_count)
            down_count = torch.where(go_down, 0, down_count)
            if not bool(active.any()):  # one host sync per epoch
                break

        reached = torch.isfinite(best_reg)
        with torch.no_grad():  # classes that never reached the threshold keep their last trigger
            best_mask[~reached] = squash(mask_t[~reached])
            best_pattern[~reached] = squash(pattern_t[~reached])
        stats = {"epochs_run": epochs_run, "reached": reached.tolist(), "costs": cost.tolist()}
        return best_mask.detach(), best_pattern.detach(), stats

    # -- 3. mitigation ------------------------------------------------------------------------
    def _unlearn(self, model: nn.Module, clean: TensorBundle, masks: torch.Tensor, patterns: torch.Tensor,
                 flagged: torch.Tensor, *, scale, seed: int, progress: bool) -> nn.Module:
        n = len(clean.train_y)
        gen = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(n, generator=gen)[:max(1, round(self.unlearn_ratio * n))].to(clean.device)
        which = flagged[torch.randint(len(flagged), (len(chosen),), generator=gen)].to(clean.device)
        stamped = stamp(to_float(clean.train_x[chosen]), masks[which], patterns[which])
        train_x = clean.train_x.clone()
        train_x[chosen] = stamped.mul(255).round_().clamp_(0, 255).to(torch.uint8)
        unlearn = replace(clean, train_x=train_x)  # true labels kept
        purified = clone(model)
        fit(purified, unlearn, self.recipe(scale, self.epochs, self.lr, self.batch_size), seed=seed,
            progress=progress, desc="nc unlearn")
        self.report["unlearn_samples"] = len(chosen)
        return purified

    def _prune(self, model: nn.Module, clean: TensorBundle, masks: torch.Tensor, patterns: torch.Tensor,
               flagged: torch.Tensor) -> nn.Module:
        name = last_linear(model)
        x = to_float(clean.train_x)
        benign = tools.activations(model, x, name, inputs=True)  # [N, C] pooled last-block features
        triggered = torch.cat([tools.activations(model, stamp(x, masks[i], patterns[i]), name, inputs=True)
                               for i in flagged.tolist()])
        # most changed by the reversed trigger first (|.|: pooled PreAct features are signed, no final ReLU)
        order = (triggered.mean(0) - benign.mean(0)).abs().argsort(descending=True)
        step = max(1, round(self.once_prune_ratio * benign.shape[1]))
        count, trace = prune_levels(model, name, benign, clean.train_y, order, step, self.acc_ratio)
        purified = clone(model)
        tools.zero_channels(purified, name, order[:count])
        self.report.update(layer=name, pruned=count, pruned_channels=order[:count].tolist(), trace=trace)
        return purified

    def purify(self, model: nn.Module, clean: TensorBundle, *, scale=None, seed: int = 0, progress: bool = True) -> nn.Module:
        masks, patterns, stats = self.reverse_engineer(model, clean, scale=scale, seed=seed)
        norms = masks.flatten(1).sum(1).float().cpu()
        flagged = flag(norms, self.threshold)
        self.report = {"norms": norms.tolist(), "anomaly_index": anomaly_index(norms).tolist(),
                       "flagged": flagged.tolist(), "mitigation": self.mitigation if len(flagged) else None,
                       **stats, "masks": masks.cpu(), "patterns": patterns.cpu()}
        if len(flagged) == 0:
            return clone(model).eval()
        masks, patterns = masks.to(clean.device), patterns.to(clean.device)
        if self.mitigation == "unlearn":
            purified = self._unlearn(model, clean, masks, patterns, flagged, scale=scale, seed=seed, progress=progress)
        else:
            purified = self._prune(model, clean, masks, patterns, flagged)
        return purified.eval()
