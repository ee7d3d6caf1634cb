"""DBD: Decoupling-based Backdoor Defense, a training-time defense.

Paper: Kunzhe Huang, Yiming Li, Baoyuan Wu, Zhan Qin, Kui Ren, "Backdoor Defense via
Decoupling the Training Process", ICLR 2022, https://arxiv.org/abs/2202.03423.

Threat model: the defender trains the model itself on the poisoned training set it was
given (which samples are poisoned is unknown); no clean data, no trigger knowledge.

Method (every phase is one ``train.fit`` run with its own ``loss_fn``):

(a) *Self-supervised pre-training* (``self_epochs``): SimCLR on the training images
    without their labels. Each batch gets two views from batched tensor augmentations
    (random resized crop, area 0.08-1 and aspect 3/4-4/3, via ``affine_grid``; horizontal
    flip; brightness and contrast jitter 0.4 with probability 0.8), the backbone
    (``model.embed``) and a 2-layer projection head (hidden = feature width, 128 out)
    map them to embeddings and the NT-Xent loss (``temperature = 0.5``) pulls the two
    views of an image together. Poisoned images cannot cluster by their (poisoned)
    label here, so the backdoor is not learnt into the features.
(b) *Warm-up* (``warmup_epochs``): the backbone is frozen (eval mode, no gradient) and
    only the linear classifier is trained with the symmetric cross-entropy (SCE,
    alpha 0.1, beta 1, as in DBD) on the poisoned labels.
(c) Split: the ``epsilon`` (50 %) fraction of samples with the lowest SCE are kept with
    their labels ("trusted"), the rest become unlabelled.
(d) *Semi-supervised fine-tuning* of the whole model (``semi_epochs``) with MixMatch:
    labelled batch with the usual crop/flip augmentation; for an equally large random
    unlabelled batch, K = 2 augmented copies, guessed label = mean softmax over them,
    sharpened with T = 0.5; MixUp of all inputs and targets with lambda ~ Beta(0.75, 0.75),
    lambda = max(lambda, 1 - lambda); loss = soft CE on the labelled part + lambda_u *
    ramp * MSE on the unlabelled part, lambda_u = 15, ramp linear from 0 to 1 over the
    phase.

Hyperparameters (BackdoorBench ``config/defense/dbd``): self-supervised epochs 100 with
batch 512, warm-up 10 epochs, semi-supervised epochs 100, epsilon 0.5; ``None`` epochs
take the scale's attack-training epochs (paper: 100) for (a) and (d) and 10 % of them (at
least 3) for (b); the SimCLR batch is 512 at paper scale, else the scale's batch size.
The crop's minimum area ``min_crop_area`` is torchvision's 0.08 at paper scale and 0.3
otherwise (None): with a few SimCLR epochs on 28x28 digits, 8 % crops leave the linear
probe near 50 % accuracy and the loss split no better than chance.
Deviations: SGD with the trainer's cosine schedule for every phase (DBD uses SGD for
SimCLR and Adam lr 0.002 for the others); temperature 0.5 as in the DBD paper's SimCLR
config (BackdoorBench's yaml sets 1); no colour-to-grey / hue / saturation jitter (they
need RGB and do not apply to 1-channel MNIST); MixMatch's labelled and unlabelled parts
go through one forward pass (no interleaving of BN batches); the unlabelled batch is
drawn at random (with replacement across steps) for each labelled batch.

After ``train`` the trusted (labelled) indices are kept in ``trusted_``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import scales
from ..data.bundle import TensorBundle, augment, to_float
from ..train import Recipe, autocast, fit
from . import register
from .base import TrainingDefense


def views(x: torch.Tensor, generator: torch.Generator, min_area: float = 0.08, jitter: float = 0.4) -> torch.Tensor:
    """One SimCLR view per image of ``x`` (floats in [0, 1]): random resized crop, flip and
    brightness/contrast jitter, all as batched tensor ops."""
    n, dev = len(x), x.device
    rand = lambda *shape: torch.rand(*shape, device=dev, generator=generator)  # noqa: E731
    area = min_area + (1 - min_area) * rand(n)
    log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * rand(n)
    ratio = log_ratio.exp()
    sx = (area * ratio).sqrt().clamp(max=1)  # crop width / image width
    sy = (area / ratio).sqrt().clamp(max=1)
    tx = (1 - sx) * (2 * rand(n) - 1)  # crop centre, in [-1, 1] grid units
    ty = (1 - sy) * (2 * rand(n) - 1)
    flip = torch.where(rand(n) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = sx * flip, tx
    theta[:, 1, 1], theta[:, 1, 2] = sy, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    apply = (rand(n) < 0.8).float()[:, None, None, None]
    bright = 1 + jitter * (2 * rand(n, 1, 1, 1) - 1)
    contrast = 1 + jitter * (2 * rand(n, 1, 1, 1) - 1)
    mean = out.mean((1, 2, 3), keepdim=True)
    jittered = ((out * bright - mean * bright) * contrast + mean * bright).clamp(0, 1)
    return apply * jittered + (1 - apply) * out


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy for positive pairs ``(z1[i], z2[i])``."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = len(z1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


def symmetric_ce(logits: torch.Tensor, y: torch.Tensor, alpha: float = 0.1, beta: float = 1.0,
                 reduction: str = "mean") -> torch.Tensor:
    """Symmetric cross-entropy (Wang et al., ICCV 2019): alpha * CE + beta * reverse CE."""
    logits = logits.float()
    ce = F.cross_entropy(logits, y, reduction="none")
    p = logits.softmax(1).clamp_min(1e-7)
    onehot = F.one_hot(y, logits.shape[1]).float().clamp_min(1e-4)
    rce = -(p * onehot.log()).sum(1)
    loss = alpha * ce + beta * rce
    return loss.mean() if reduction == "mean" else loss


class SimCLRNet(nn.Module):
    """The classifier plus a projection head, trained together by ``fit`` in phase (a)."""

    def __init__(self, model: nn.Module, feature_dim: int, out_dim: int = 128):
        super().__init__()
        self.model = model
        self.head = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(inplace=True),
                                  nn.Linear(feature_dim, out_dim))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.model.embed(self.model.normalize(x)))


@register("dbd")
@dataclass
class DecouplingDefense(TrainingDefense):
    self_epochs: int | None = None
    warmup_epochs: int | None = None
    semi_epochs: int | None = None
    epsilon: float = 0.5
    temperature: float = 0.5
    lr_self: float = 0.1
    lr_warmup: float = 0.1
    lr_semi: float = 0.01
    batch_size_self: int | None = None
    batch_size: int | None = None
    mixup_alpha: float = 0.75
    sharpen_t: float = 0.5
    lambda_u: float = 15.0
    augmentations: int = 2
    min_crop_area: float | None = None
    trusted_: torch.Tensor | None = field(default=None, init=False, repr=False)

    name = "dbd"

    def __post_init__(self) -> None:
        for key in ("self_epochs", "warmup_epochs", "semi_epochs", "batch_size_self", "batch_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key} must be >= 1 (or None for the scale preset), got {value}")
        if not 0 < self.epsilon < 1:
            raise ValueError(f"epsilon (trusted fraction) must be in (0, 1), got {self.epsilon}")
        for key in ("temperature", "lr_self", "lr_warmup", "lr_semi", "mixup_alpha", "sharpen_t"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        if self.lambda_u < 0:
            raise ValueError(f"lambda_u must be >= 0, got {self.lambda_u}")
        if self.min_crop_area is not None and not 0 < self.min_crop_area <= 1:
            raise ValueError(f"min_crop_area must be in (0, 1], got {self.min_crop_area}")
        if self.augmentations < 1:
            raise ValueError(f"augmentations (K) must be >= 1, got {self.augmentations}")

    def budget(self, scale) -> dict[str, int]:
        preset = scales.get(scale)
        total = preset.epochs
        return {"self": self.self_epochs or total,
                "warmup": self.warmup_epochs or max(3, round(0.1 * total)),
                "semi": self.semi_epochs or total,
                "batch_self": self.batch_size_self or (512 if preset.name == "paper" else preset.batch_size),
                "batch": self.batch_size or preset.batch_size,
                "crop": self.min_crop_area or (0.08 if preset.name == "paper" else 0.3)}

    # (a) -------------------------------------------------------------------------------
    def pretrain(self, model: nn.Module, poisoned: TensorBundle, epochs: int, batch: int, seed: int,
                 progress: bool, crop: float = 0.08) -> None:
        with torch.no_grad():
            dim = model.embed(model.normalize(to_float(poisoned.train_x[:2]).to(poisoned.device))).shape[1]
        with torch.random.fork_rng(devices=[]):  # the head's init depends on ``seed`` only
            torch.manual_seed(seed)
            net = SimCLRNet(model, dim).to(poisoned.device)
        gen = torch.Generator(device=poisoned.device).manual_seed(seed)

        def loss_fn(wrapper: nn.Module, x: torch.Tensor, y: torch.Tensor):
            z1 = wrapper.project(views(x, gen, crop))
            z2 = wrapper.project(views(x, gen, crop))
            loss = nt_xent(z1, z2, self.temperature)
            return loss, torch.zeros(len(x), 2, device=x.device)  # no labels: accuracy stays 0

        fit(net, poisoned, Recipe(epochs, batch, self.lr_self, augment=False), seed=seed, loss_fn=loss_fn,
            progress=progress, desc="dbd self-supervised")

    # (b) -------------------------------------------------------------------------------
    def warmup(self, model: nn.Module, poisoned: TensorBundle, epochs: int, batch: int, seed: int,
               progress: bool) -> None:
        def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor):
            m.eval()  # frozen backbone: no gradient, no BN statistics update
            with torch.no_grad():
                z = m.embed(m.normalize(x))
            m.train()
            logits = m.classify(z.detach())
            return symmetric_ce(logits, y), logits

        fit(model, poisoned, Recipe(epochs, batch, self.lr_warmup), seed=seed, loss_fn=loss_fn,
            progress=progress, desc="dbd warm-up")

    # (c) -------------------------------------------------------------------------------
    @torch.no_grad()
    def split(self, model: nn.Module, poisoned: TensorBundle) -> tuple[torch.Tensor, torch.Tensor]:
        """(trusted, unlabelled) indices: the ``epsilon`` fraction with the lowest SCE, the rest."""
        model.eval()
        losses = []
        for start in range(0, len(poisoned.train_y), 1024):
            x = to_float(poisoned.train_x[start:start + 1024])
            with autocast(x.device):
                logits = model(x)
            losses.append(symmetric_ce(logits, poisoned.train_y[start:start + 1024], reduction="none"))
        losses = torch.cat(losses)
        n = len(losses)
        k = min(n - 2, max(2, round(self.epsilon * n)))
        order = losses.argsort()
        return order[:k].sort().values, order[k:].sort().values

    # (d) -------------------------------------------------------------------------------
    def semi(self, model: nn.Module, poisoned: TensorBundle, trusted: torch.Tensor, unlabelled: torch.Tensor,
             epochs: int, batch: int, seed: int, progress: bool) -> None:
        labelled = poisoned.subset(trusted)
        pool = poisoned.train_x[unlabelled.to(poisoned.device)]
        classes = poisoned.num_classes
        gen = torch.Generator(device=poisoned.device).manual_seed(seed)
        rng = np.random.default_rng(seed)  # MixUp's lambda: a host-side scalar per step, seeded
        steps_per_epoch = max(1, math.ceil(len(trusted) / batch))
        total = max(1, epochs * steps_per_epoch)
        state = {"step": 0}

        def loss_fn(m: nn.Module, x: torch.Tensor, y: torch.Tensor):
            n = len(x)
            pick = torch.randint(0, len(pool), (n,), device=x.device, generator=gen)
            u = to_float(pool[pick])
            us = [augment(u, poisoned.crop_padding, poisoned.flip, gen) for _ in range(self.augmentations)]
            with torch.no_grad():
                p = torch.stack([m(v).float().softmax(1) for v in us]).mean(0)
                p = p.pow(1 / self.sharpen_t)
                q = p / p.sum(1, keepdim=True)
            inputs = torch.cat([x, *us])
            targets = torch.cat([F.one_hot(y, classes).float(), *([q] * self.augmentations)])
            lam = float(rng.beta(self.mixup_alpha, self.mixup_alpha))
            lam = max(lam, 1 - lam)
            perm = torch.randperm(len(inputs), device=x.device, generator=gen)
            mixed_x = lam * inputs + (1 - lam) * inputs[perm]
            mixed_t = lam * targets + (1 - lam) * targets[perm]
            logits = m(mixed_x).float()
            loss_x = -(mixed_t[:n] * logits[:n].log_softmax(1)).sum(1).mean()
            loss_u = (logits[n:].softmax(1) - mixed_t[n:]).square().mean()
            ramp = min(1.0, state["step"] / total)
            state["step"] += 1
            return loss_x + self.lambda_u * ramp * loss_u, logits[:n]

        fit(model, labelled, Recipe(epochs, batch, self.lr_semi), seed=seed, loss_fn=loss_fn,
            progress=progress, desc="dbd semi-supervised")

    def train(self, model: nn.Module, poisoned: TensorBundle, *, scale=None, seed: int = 0,
              progress: bool = True) -> nn.Module:
        n = len(poisoned.train_y)
        if n < 8:
            raise ValueError(f"DBD needs at least 8 training samples, got {n}")
        b = self.budget(scale)
        self.pretrain(model, poisoned, b["self"], b["batch_self"], seed, progress, b["crop"])
        self.warmup(model, poisoned, b["warmup"], b["batch"], seed + 1, progress)
        trusted, unlabelled = self.split(model, poisoned)
        self.trusted_ = trusted
        self.semi(model, poisoned, trusted, unlabelled, b["semi"], b["batch"], seed + 2, progress)
        model.eval()
        return model
