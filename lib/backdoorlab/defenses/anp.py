"""ANP: Adversarial Neuron Pruning.

Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep Models", NeurIPS 2021,
https://arxiv.org/abs/2110.14430.

Threat model: the defender holds the trained (possibly backdoored) model and a small
clean subset (5% in BackdoorBench); no trigger knowledge, no poisoned samples.

Method: every BatchNorm2d channel gets a mask m in [0, 1] (init 1) on its scale, and
adversarial neuron perturbations delta (added to m) and xi (relative change of the bias),
both in [-eps, eps]. Per clean batch: random start delta, xi ~ U(-eps, eps); ``anp_steps``
signed-gradient steps of size eps/anp_steps *maximising* the clean loss; then one SGD step
(lr 0.2, momentum 0.9) on the masks minimising
``anp_alpha * CE(masked) + (1 - anp_alpha) * CE(masked + perturbed)``; masks clipped to
[0, 1]. As in BackdoorBench the masks are learned in train mode (BN batch statistics) on a
copy. Channels whose mask is ``<= threshold`` have their BN scale zeroed in a copy of the
original model (BN bias kept, as ANP/BackdoorBench prune), for thresholds 0, 0.05, ...,
``pruning_max``.

Hyperparameters (BackdoorBench ``config/defense/anp``): nb_iter 2000 batches, anp_eps 0.4,
anp_steps 1, anp_alpha 0.2, mask lr 0.2, pruning by threshold up to 0.90 in steps of 0.05,
acc_ratio 0.1. ``nb_iter=None`` takes 2000 at ``paper`` scale, 300 at ``smoke`` and 1000 at
``default``; ``batch_size=None`` takes the preset's defense batch (paper: 256).

Deviations from BackdoorBench: the threshold is chosen by the clean-data rule (largest
threshold whose accuracy on the defender's clean data stays within a relative drop of
``acc_ratio`` of the unpruned model's), not by the lowest *test* ASR; the perturbations are
projected back into [-eps, eps] after each step (the paper's constraint; BackdoorBench
leaves them unclipped); batches are reshuffled passes over the clean set rather than
sampling with replacement.

>>> purified = defenses.create("anp").purify(model, clean, scale="default")
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import scales
from ..data.bundle import TensorBundle
from ..train import progress_bar
from . import register
from .base import Defense
from .masking import ChannelMasks, below, check_range, frozen, infinite_batches, prune_by_clean_rule, thresholds

NB_ITER = {"smoke": 300, "default": 1000, "paper": 2000}


@register("anp")
@dataclass
class ANP(Defense):
    nb_iter: int | None = None
    anp_eps: float = 0.4
    anp_steps: int = 1
    anp_alpha: float = 0.2
    lr: float = 0.2
    batch_size: int | None = None
    pruning_max: float = 0.90
    pruning_step: float = 0.05
    acc_ratio: float = 0.1

    name = "anp"

    def __post_init__(self) -> None:
        if self.nb_iter is not None and self.nb_iter < 1:
            raise ValueError(f"nb_iter must be >= 1, got {self.nb_iter}")
        if self.anp_steps < 1:
            raise ValueError(f"anp_steps must be >= 1, got {self.anp_steps}")
        check_range("anp_eps", self.anp_eps, 0, 1)
        check_range("anp_alpha", self.anp_alpha, 0, 1)
        check_range("lr", self.lr, 0, float("inf"), low_open=True)
        check_range("pruning_max", self.pruning_max, 0, 1)
        check_range("pruning_step", self.pruning_step, 0, 1, low_open=True)
        check_range("acc_ratio", self.acc_ratio, 0, 1)
        if self.batch_size is not None and self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {self.batch_size}")

    def learn_masks(self, model: nn.Module, clean: TensorBundle, *, scale=None, seed: int = 0,
                    progress: bool = False) -> dict[str, torch.Tensor]:
        """ANP's mask optimisation on a frozen copy of ``model``: BN name -> mask values."""
        preset = scales.get(scale)
        nb_iter = self.nb_iter or NB_ITER.get(preset.name, 2000)
        net = frozen(model).to(clean.device).train()
        gen = torch.Generator().manual_seed(seed)
        eps = self.anp_eps
        with ChannelMasks(net, noise=eps > 0) as cm, progress_bar(nb_iter, "anp", progress) as bar:
            mask_opt = torch.optim.SGD(cm.masks(), lr=self.lr, momentum=0.9)
            noise_opt = torch.optim.SGD(cm.noises(), lr=eps / self.anp_steps) if eps > 0 else None
            data = infinite_batches(clean, self.batch_size or preset.defense_batch_size, gen)
            for _ in range(nb_iter):
                x, y = next(data)
                if noise_opt is not None:  # step 1: adversarial neuron perturbation
                    cm.reset_noise(eps, gen)
                    cm.perturbed = True
                    for _ in range(self.anp_steps):
                        noise_opt.zero_grad(set_to_none=True)
                        (-F.cross_entropy(net(x), y)).backward()
                        for t in cm.noises():
                            t.grad.sign_()
                        noise_opt.step()
                        cm.clip_(eps)
                mask_opt.zero_grad(set_to_none=True)  # step 2: masks against natural + perturbed loss
                loss_rob = F.cross_entropy(net(x), y) if noise_opt is not None else 0.0
                cm.perturbed = False
                loss = self.anp_alpha * F.cross_entropy(net(x), y) + (1 - self.anp_alpha) * loss_rob
                loss.backward()
                mask_opt.step()
                cm.clip_()
                bar.update(1)
            return cm.values()

    def purify(self, model: nn.Module, clean: TensorBundle, *, scale=None, seed: int = 0, progress: bool = True) -> nn.Module:
        values = self.learn_masks(model, clean, scale=scale, seed=seed, progress=progress)
        purified, level, trace = prune_by_clean_rule(
            model, lambda t: below(values, t), thresholds(self.pruning_max, self.pruning_step), clean,
            max_drop=self.acc_ratio, keep_bias=True)
        self.selection = {"threshold": level, "trace": trace}
        return purified
