"""Mixed-sample data augmentation (MSDA): MixUp, CutMix and FMix, batched on the device.

One interface for the three: ``mix(x, y, method)`` returns ``Mixed(x, y_a, y_b, lam)``
where ``x`` is ``mask * x + (1 - mask) * x[perm]`` (MixUp's "mask" is the constant
``lam``), and ``mixed_cross_entropy(logits, mixed)`` is ``lam * CE(logits, y_a) +
(1 - lam) * CE(logits, y_b)``. As in the three papers' code, one ``lam`` and one mask are
drawn per batch and shared by every sample and channel, with a random pairing ``perm``.

- MixUp (Zhang et al., ICLR 2018, https://arxiv.org/abs/1710.09412): ``lam ~ Beta(alpha,
  alpha)``, ``x = lam * x + (1 - lam) * x[perm]``.
- CutMix (Yun et al., ICCV 2019, https://arxiv.org/abs/1905.04899): a box of area
  ``(1 - lam) * H * W`` at a uniform centre (clipped at the border) is pasted from
  ``x[perm]``; ``lam`` is then the exact kept fraction.
- FMix (Harris et al., 2020, "FMix: Enhancing Mixed Sample Data Augmentation",
  https://arxiv.org/abs/2002.12047): a random complex spectrum with magnitude
  ``1 / max(f, 1 / max(H, W)) ** decay_power`` (``decay_power`` 3) is inverted by an
  inverse real FFT into a low-frequency grey image; its top ``lam * H * W`` pixels (rounded
  up or down with probability 1/2) form the binary mask, so the kept fraction is ``lam``.

``lam``, the rounding and the CutMix box are drawn on the host from a seeded NumPy
generator (Python numbers, no device sync); the pairing and the FMix spectrum are drawn on the device.

>>> loss_fn = mixing.loss_fn("fmix", seed=0)   # a train.fit loss
>>> history = train.fit(model, data, recipe, loss_fn=loss_fn)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("mixup", "cutmix", "fmix")


@dataclass(frozen=True)
class Mixed:
    """A mixed batch: ``x`` holds ``lam`` of ``y_a``'s images and ``1 - lam`` of ``y_b``'s."""

    x: torch.Tensor
    y_a: torch.Tensor
    y_b: torch.Tensor
    lam: float


def check(method: str, alpha: float = 1.0, decay_power: float = 3.0) -> None:
    """A clear error for a bad method or hyperparameter, before any compute."""
    if method not in METHODS:
        raise ValueError(f"unknown mixing method {method!r}; valid choices: {', '.join(METHODS)}")
    if not alpha > 0:
        raise ValueError(f"alpha (the Beta(alpha, alpha) parameter of lambda) must be > 0, got {alpha}")
    if not decay_power > 0:
        raise ValueError(f"decay_power (FMix's spectrum decay) must be > 0, got {decay_power}")


def _host_rng(rng: np.random.Generator | None = None) -> np.random.Generator:
    """``rng``, or if None a NumPy generator seeded from torch's global CPU generator: calls
    without an ``rng`` then draw afresh each time and are reproducible under ``torch.manual_seed``
    (the spectrum and the pairing use torch's generator too)."""
    return rng if rng is not None else np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,))))


def sample_lambda(alpha: float, rng: np.random.Generator) -> float:
    """``lam ~ Beta(alpha, alpha)``, drawn on the host."""
    return float(rng.beta(alpha, alpha))


def fmix_mask(lam: float, size: tuple[int, int], decay_power: float = 3.0, *, device=None,
              generator: torch.Generator | None = None, rng: np.random.Generator | None = None) -> torch.Tensor:
    """A binary ``(H, W)`` FMix mask whose mean is ``lam`` (``ceil`` or ``floor`` of
    ``lam * H * W`` pixels, chosen with probability 1/2 from ``rng``)."""
    h, w = size
    fy = torch.fft.fftfreq(h, device=device)[:, None]
    fx = torch.fft.rfftfreq(w, device=device)[None, :]
    freq = (fx.pow(2) + fy.pow(2)).sqrt()
    scale = 1.0 / freq.clamp_min(1.0 / max(h, w)).pow(decay_power)
    noise = torch.randn((2, *freq.shape), generator=generator, device=device)
    image = torch.fft.irfft2(torch.complex(noise[0], noise[1]) * scale, s=(h, w))
    exact = lam * h * w
    up = _host_rng(rng).random() < 0.5  # host-side: no device sync
    count = math.ceil(exact) if up else math.floor(exact)
    mask = torch.zeros(h * w, device=device)
    if count > 0:
        mask[image.flatten().topk(count).indices] = 1.0
    return mask.view(h, w)


def cutmix_mask(lam: float, size: tuple[int, int], *, device=None,
                rng: np.random.Generator | None = None) -> tuple[torch.Tensor, float]:
    """A ``(H, W)`` mask that is 0 inside one box of area about ``(1 - lam) * H * W`` and
    1 elsewhere, and the exact kept fraction (the box is clipped at the border)."""
    h, w = size
    cut = math.sqrt(1.0 - lam)
    bh, bw = int(h * cut), int(w * cut)
    rng = _host_rng(rng)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = max(cy - bh // 2, 0), min(cy + bh // 2, h)
    x0, x1 = max(cx - bw // 2, 0), min(cx + bw // 2, w)
    mask = torch.ones(h, w, device=device)
    mask[y0:y1, x0:x1] = 0.0
    return mask, 1.0 - (y1 - y0) * (x1 - x0) / (h * w)


def mix(x: torch.Tensor, y: torch.Tensor, method: str = "mixup", *, alpha: float = 1.0, decay_power: float = 3.0,
        generator: torch.Generator | None = None, rng: np.random.Generator | None = None) -> Mixed:
    """Mix a batch ``x`` (N, C, H, W) with a random permutation of itself."""
    check(method, alpha, decay_power)
    rng = _host_rng(rng)
    lam = sample_lambda(alpha, rng)
    perm = torch.randperm(len(x), generator=generator, device=x.device)
    if method == "mixup":
        mixed = lam * x + (1 - lam) * x[perm]
    else:
        if method == "fmix":
            mask = fmix_mask(lam, x.shape[-2:], decay_power, device=x.device, generator=generator, rng=rng)
        else:
            mask, lam = cutmix_mask(lam, x.shape[-2:], device=x.device, rng=rng)
        mask = mask.to(x.dtype)
        mixed = mask * x + (1 - mask) * x[perm]
    return Mixed(mixed, y, y[perm], lam)


def mixed_cross_entropy(logits: torch.Tensor, mixed: Mixed) -> torch.Tensor:
    """``lam * CE(logits, y_a) + (1 - lam) * CE(logits, y_b)``."""
    logits = logits.float()
    return mixed.lam * F.cross_entropy(logits, mixed.y_a) + (1 - mixed.lam) * F.cross_entropy(logits, mixed.y_b)


class MixingLoss:
    """A ``train.fit`` loss that mixes every batch with ``method`` and returns the mixed
    cross-entropy and the logits (``fit``'s running accuracy is then against ``y_a``).

    Its random streams (a NumPy generator for the mixing ratios and boxes, a torch generator
    per device for the permutations and FMix masks) are part of a training checkpoint
    (``checkpoint_state`` / ``restore_checkpoint_state``, saved and restored by ``train.fit``),
    so a resumed run draws the same mixes as an uninterrupted one."""

    def __init__(self, method: str, *, alpha: float = 1.0, decay_power: float = 3.0, seed: int = 0) -> None:
        check(method, alpha, decay_power)
        self.method, self.alpha, self.decay_power, self.seed = method, alpha, decay_power, seed
        self.rng = np.random.default_rng(seed)
        self.generators: dict[str, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self.generators:
            self.generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self.generators[key]

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mixed = mix(x, y, self.method, alpha=self.alpha, decay_power=self.decay_power,
                    generator=self._generator(x.device), rng=self.rng)
        logits = model(mixed.x)
        return mixed_cross_entropy(logits, mixed), logits

    def checkpoint_state(self) -> dict:
        """JSON-ready state of the random streams."""
        return {"numpy": self.rng.bit_generator.state,
                "torch": {device: gen.get_state().tolist() for device, gen in self.generators.items()}}

    def restore_checkpoint_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["numpy"]
        for device, values in state["torch"].items():
            self._generator(torch.device(device)).set_state(torch.tensor(values, dtype=torch.uint8))


def loss_fn(method: str, *, alpha: float = 1.0, decay_power: float = 3.0, seed: int = 0) -> MixingLoss:
    """A ``train.fit`` loss that mixes every batch with ``method`` (see :class:`MixingLoss`)."""
    return MixingLoss(method, alpha=alpha, decay_power=decay_power, seed=seed)


__all__ = ["METHODS", "Mixed", "MixingLoss", "check", "sample_lambda", "fmix_mask", "cutmix_mask", "mix",
           "mixed_cross_entropy", "loss_fn"]
