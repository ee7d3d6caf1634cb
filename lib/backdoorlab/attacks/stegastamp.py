"""Small StegaStamp-style networks for SSBA: an encoder that hides a bit string in an
image as an additive residual, and a decoder that reads the bits back.

After Tancik, Mildenhall & Ng, "StegaStamp: Invisible Hyperlinks in Physical
Photographs", CVPR 2020 (https://arxiv.org/abs/1904.05343), scaled down for 28-64 px
images: the secret goes through a dense layer to a coarse map, is upsampled to the
image size and concatenated with the image; a two-level U-Net returns the residual.
No batch normalisation, so every image is encoded independently of its batch.

Training (``train_stegastamp``): random secrets per image (so the encoder must really
encode), loss = ``residual_weight`` x mean squared residual (ramped up linearly over the
first half of the steps, as StegaStamp ramps its image losses) + bit cross-entropy;
Gaussian noise (std 0.02, StegaStamp's ``rnd_noise``) between encoder and decoder; Adam
lr 1e-4 (StegaStamp's). LPIPS and the critic of StegaStamp are left out.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.LeakyReLU(0.2))


class Encoder(nn.Module):
    def __init__(self, channels: int, bits: int, width: int = 32):
        super().__init__()
        self.secret = nn.Linear(bits, 16 * 16)  # a coarse 16x16 map, upsampled to the image
        self.inc = nn.Sequential(_conv(channels + 1, width), _conv(width, width))
        self.down1 = _conv(width, 2 * width, 2)
        self.down2 = _conv(2 * width, 4 * width, 2)
        self.up2 = _conv(4 * width + 2 * width, 2 * width)
        self.up1 = _conv(2 * width + width, width)
        self.out = nn.Conv2d(width + channels, channels, 1)

    def forward(self, x: torch.Tensor, secret: torch.Tensor) -> torch.Tensor:
        """The residual for images ``x`` in [0, 1] and secrets ``float[B, bits]`` in {0, 1}."""
        s = F.relu(self.secret(secret * 2 - 1)).view(-1, 1, 16, 16)
        s = F.interpolate(s, size=x.shape[-2:], mode="nearest")
        a = self.inc(torch.cat([x - 0.5, s], 1))
        b = self.down1(a)
        c = self.down2(b)
        u = F.interpolate(c, size=b.shape[-2:], mode="nearest")
        u = self.up2(torch.cat([u, b], 1))
        u = F.interpolate(u, size=a.shape[-2:], mode="nearest")
        u = self.up1(torch.cat([u, a], 1))
        return self.out(torch.cat([u, x - 0.5], 1))


class Decoder(nn.Module):
    def __init__(self, channels: int, bits: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(_conv(channels, width, 2), _conv(width, 2 * width, 2),
                                      _conv(2 * width, 4 * width, 2), nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(64 * width, 256), nn.LeakyReLU(0.2), nn.Linear(256, bits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Bit logits for (encoded) images ``x`` in [0, 1]."""
        return self.head(self.features(x - 0.5))


def train_stegastamp(images: Callable[[int], torch.Tensor], channels: int, bits: int, width: int, steps: int,
                     residual_weight: float, *, batch_size: int = 64, lr: float = 1e-4, noise: float = 0.02,
                     device: Any = "cpu", seed: int = 0, progress: Any = None) -> tuple[Encoder, dict[str, float]]:
    """Train an encoder/decoder pair; ``images(n)`` draws ``n`` training images in [0, 1].
    Returns the encoder (eval mode, frozen) and final statistics (bit accuracy, residual RMS)."""
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder, decoder = Encoder(channels, bits, width).to(device), Decoder(channels, bits, width).to(device)
    opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=lr)
    quiet, ramp = int(0.3 * steps), max(1, int(0.3 * steps))  # no image loss, then a linear ramp
    stats = torch.zeros(2, device=device)
    for step in range(steps):
        x = images(batch_size)
        secret = torch.randint(0, 2, (len(x), bits), device=device, generator=g).float()
        residual = encoder(x, secret)
        encoded = (x + residual).clamp(0, 1)
        noisy = encoded + noise * torch.randn(encoded.shape, device=device, generator=g)
        logits = decoder(noisy)
        bit_loss = F.binary_cross_entropy_with_logits(logits, secret)
        image_loss = residual.pow(2).mean()
        loss = bit_loss + residual_weight * min(1.0, max(0, step - quiet) / ramp) * image_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress.update(1)
        if step == steps - 1:
            with torch.no_grad():
                stats = torch.stack([((logits > 0).float() == secret).float().mean(), image_loss.sqrt()])
    encoder.eval().requires_grad_(False)
    acc, rms = stats.tolist()
    return encoder, {"bit_accuracy": acc, "residual_rms": rms}
