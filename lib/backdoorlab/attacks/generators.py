"""Building blocks shared by the training-controlled attacks (WaNet, Input-aware, LIRA,
BppAttack): small trigger-generator networks, per-batch sample selection without host
syncs, and saving/restoring a generator with the attacked model.

- :class:`PatternNet`: Input-aware's conv encoder-decoder (3x3 conv + BN + ReLU blocks,
  max-pool down, bilinear up), any image size (the decoder upsamples to the encoder's
  recorded sizes).
- :class:`AutoEncoder`: LIRA's stride-2 4x4 conv encoder / transposed-conv decoder with
  a ``tanh`` output in (-1, 1).
- :func:`pick_extra`: choose a random subset of the *unpoisoned* samples of a batch
  (WaNet's noise-mode samples, Input-aware's cross samples, BppAttack's negatives) with
  a device generator: one ``argsort``, no ``.item()``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def conv_block(c_in: int, c_out: int, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out, momentum=0.05)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class PatternNet(nn.Module):
    """Input-aware's generator (BackdoorBench: 16 channels and 2 down steps on MNIST,
    32 and 3 elsewhere). ``forward`` returns the raw last-layer map ``[B, out, H, W]``."""

    def __init__(self, in_channels: int, out_channels: int, base: int = 32, steps: int = 3):
        super().__init__()
        self.down = nn.ModuleList()
        c, n = in_channels, base
        for step in range(steps):
            self.down.append(nn.Sequential(conv_block(c, n), conv_block(n, n)))
            c = n
            n = n * 2 if step < steps - 1 else n
        self.middle = conv_block(c, c)
        self.up = nn.ModuleList()
        for step in range(steps):
            last = step == steps - 1
            nxt = out_channels if last else c // 2
            self.up.append(nn.Sequential(conv_block(c, c), conv_block(c, nxt, relu=not last)))
            c = nxt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes = []
        for block in self.down:
            x = block(x)
            sizes.append(x.shape[-2:])
            x = F.max_pool2d(x, 2)
        x = self.middle(x)
        for block, size in zip(self.up, reversed(sizes)):
            x = block(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
        return x


class AutoEncoder(nn.Module):
    """LIRA's autoencoder: 4x4 stride-2 convolutions (16, 32, 64, 128 channels, BN + ReLU)
    and transposed convolutions back to the input size; output in (-1, 1) (``tanh``)."""

    def __init__(self, channels: int, widths: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        dims = (channels, *widths)
        self.encoder = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 4, stride=2, padding=1), nn.BatchNorm2d(b), nn.ReLU())
            for a, b in zip(dims[:-1], dims[1:]))
        self.decoder = nn.ModuleList(nn.ConvTranspose2d(b, a, 4, stride=2, padding=1)
                                     for a, b in reversed(list(zip(dims[:-1], dims[1:]))))
        self.decoder_norm = nn.ModuleList(nn.BatchNorm2d(a) for a in reversed(dims[1:-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes = []
        for layer in self.encoder:
            sizes.append(x.shape[-2:])
            x = layer(x)
        for i, (deconv, size) in enumerate(zip(self.decoder, reversed(sizes))):
            x = deconv(x, output_size=list(size))
            if i < len(self.decoder_norm):
                x = F.relu(self.decoder_norm[i](x))
        return torch.tanh(x)


def pick_extra(mask: torch.Tensor, count: torch.Tensor | float, generator: torch.Generator | None) -> torch.Tensor:
    """A bool mask of ``floor(count)`` random samples among those where ``mask`` is false
    (fewer if there are not enough). ``count`` may be a device tensor: no host sync."""
    score = torch.rand(mask.shape, device=mask.device, generator=generator).masked_fill(mask, 2.0)
    rank = score.argsort().argsort()
    limit = torch.floor(count) if isinstance(count, torch.Tensor) else math.floor(count)  # no host->device copy
    return (rank < limit) & ~mask


def partner(n: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """Index of *another* sample of the batch for each sample (a random cyclic shift)."""
    shift = torch.randint(1, max(n, 2), (1,), device=device, generator=generator)
    return (torch.arange(n, device=device) + shift) % n


@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Run ``modules`` in eval mode without gradients, restoring their modes after."""
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


@torch.no_grad()
def recalibrate_batchnorm(net: nn.Module, images: torch.Tensor, batch_size: int) -> None:
    """Set ``net``'s BatchNorm running statistics to their average over ``images`` (in
    batches, train mode, weights untouched), so that eval mode reproduces what training saw."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if len(images) < 2:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    mode = net.training
    net.train()
    for start in range(0, len(images), batch_size):
        if len(images) - start > 1:
            net(images[start:start + batch_size])
    net.train(mode)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


def seeded_init(build, seed: int) -> nn.Module:
    """Build a network with weights drawn from ``seed`` (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def pack(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().clone() for k, v in module.state_dict().items()}


def unpack(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def device_generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)
