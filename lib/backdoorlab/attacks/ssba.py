"""SSBA: invisible, sample-specific triggers made by a steganography encoder.

Paper: Li, Li, Wu, Li, He & Lyu, "Invisible Backdoor Attack with Sample-Specific
Triggers", ICCV 2021. https://arxiv.org/abs/2012.03816

Threat model: dirty-label data poisoning. The attacker trains a StegaStamp encoder/
decoder on data of its own, then poisons ``pratio`` of the training set: each image gets
the encoder's residual for one fixed secret bit string (a different, image-dependent,
near-invisible residual per image), and the target label; no control over training.
At test time the same encoder makes the trigger: ``x' = clip(x + E(x, secret), 0, 1)``.

Hyperparameters: BackdoorBench ships pre-encoded images (a StegaStamp encoder from the
SSBA authors); target 0, all-to-one, pratio 0.1. Here the package trains its own small
StegaStamp-style pair in ``prepare`` (see :mod:`backdoorlab.attacks.stegastamp`) on the
training images (as SSBA trains its encoder on the benign training set): ``bits`` 100
(StegaStamp's secret length), ``residual_weight`` 2 (StegaStamp's L2 loss scale; higher
values give a fainter residual); the secret is a fixed random bit string drawn from the
seed. Network width, steps, batch and learning rate per scale: ``ENCODER`` ("paper":
StegaStamp's 140,000 Adam steps at lr 1e-4, width 32; the shorter scales use smaller
networks and a larger lr to converge in seconds or a minute).

Deviations: no LPIPS or critic loss and small networks, so on 28x28 digits the residual
is faint but visible (PSNR about 19-23 dB at smoke/default), where the paper's triggers
are near-invisible. The encoder and secret are cached in the zoo and ``prepare`` loads
them, so nothing is saved with the attacked model.

>>> attack = SSBA()
>>> attack.prepare(bundle, scale="smoke")
>>> poisoned = attack.apply(images)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import __version__, scales, zoo
from . import register
from .base import Attack
from .stegastamp import Encoder, train_stegastamp

# Encoder/decoder training per scale ("paper": StegaStamp's 140,000 Adam steps at lr 1e-4; the
# shorter scales use smaller networks and a larger lr to converge in seconds or a minute).
ENCODER = {
    "smoke": {"steps": 200, "lr": 3e-3, "batch": 32, "width": 8},
    "default": {"steps": 2000, "lr": 1e-3, "batch": 32, "width": 16},
    "paper": {"steps": 140_000, "lr": 1e-4, "batch": 64, "width": 32},
}


@register("ssba")
@dataclass
class SSBA(Attack):
    bits: int = 100  # secret length
    residual_weight: float = 2.0  # weight of the residual's mean square in the encoder loss

    name = "ssba"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 1024:
            raise ValueError(f"bits must be an integer in 1..1024, got {self.bits!r}")
        if not 0 <= self.residual_weight <= 1000:
            raise ValueError(f"residual_weight must be in [0, 1000], got {self.residual_weight}")

    def validate(self, num_classes: int, shape: tuple[int, int, int] | None = None) -> None:
        super().validate(num_classes, shape)
        if shape is not None and min(shape[1:]) < 8:
            raise ValueError(f"ssba needs images of at least 8x8 pixels, got {shape[1]}x{shape[2]}")

    def prepare(self, data: Any, *, scale: Any = None, seed: int = 0, progress: bool = False) -> None:
        """Train the encoder/decoder on the training images (once; then from the zoo)."""
        self.validate(data.num_classes, data.shape)
        preset = scales.get(scale)
        budget = ENCODER[preset.name]
        params = {k: v for k, v in self.params().items() if k not in ("target", "label_mode")}
        key = {"role": "ssba-encoder", "dataset": data.name, "shape": list(data.shape), "n_train": len(data.train_y),
               "seed": seed, "scale": preset.name, "budget": budget, "params": params, "version": __version__}
        label = f"ssba-encoder-{data.name}-s{seed}-{preset.name}"

        def build() -> dict[str, torch.Tensor]:
            from ..train import progress_bar

            g = torch.Generator().manual_seed(seed)

            def draw(n: int) -> torch.Tensor:
                pick = torch.randint(len(data.train_y), (n,), generator=g).to(data.device)
                return data.train_x[pick].float() / 255

            with progress_bar(budget["steps"], "ssba encoder", progress) as bar:
                encoder, stats = train_stegastamp(draw, data.shape[0], self.bits, budget["width"], budget["steps"],
                                                  self.residual_weight, batch_size=budget["batch"], lr=budget["lr"],
                                                  device=data.device, seed=seed, progress=bar)
            secret = torch.randint(0, 2, (self.bits,), generator=torch.Generator().manual_seed(seed + 1))
            return {**{f"encoder.{k}": v for k, v in encoder.state_dict().items()}, "secret": secret.float(),
                    "bit_accuracy": torch.tensor(stats["bit_accuracy"]), "residual_rms": torch.tensor(stats["residual_rms"])}

        tensors = zoo.cached_tensors(label, key, build, data.device)
        self._cache.clear()
        self._cache["state"] = {k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")}
        self._cache["secret"], self._cache["shape"] = tensors["secret"], tuple(data.shape)
        self._cache["width"] = budget["width"]
        self._cache["stats"] = {k: float(tensors[k]) for k in ("bit_accuracy", "residual_rms")}

    def encoder(self, device: torch.device) -> tuple[Encoder, torch.Tensor]:
        if "state" not in self._cache:
            raise RuntimeError("ssba: call prepare(data, scale=..., seed=...) first: it trains the StegaStamp encoder")

        def build() -> tuple[Encoder, torch.Tensor]:
            net = Encoder(self._cache["shape"][0], self.bits, self._cache["width"])
            net.load_state_dict(self._cache["state"])
            return net.to(device).eval().requires_grad_(False), self._cache["secret"].to(device)[None]

        return self.cached(("encoder", device), build)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        net, secret = self.encoder(x.device)
        if tuple(x.shape[1:]) != self._cache["shape"]:
            raise ValueError(f"ssba: the encoder was trained on images {self._cache['shape']}, got {tuple(x.shape[1:])}")
        xf = x.float()
        residual = net(xf, secret.expand(len(x), -1))
        return (xf + residual).clamp(0, 1).to(x.dtype)
