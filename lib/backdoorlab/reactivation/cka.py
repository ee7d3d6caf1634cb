"""Linear centred kernel alignment (CKA; Kornblith et al., ICML 2019) between two
representations of the same ``n`` inputs, as the Backdoor Existence Coefficient of Zhu,
Liang, Wu ("Breaking the False Sense of Security in Backdoor Defense through Re-Activation
Attack", NeurIPS 2024) uses it: centred linear Gram matrices, the biased HSIC estimator
(no bias correction, like the official ``linear_CKA``), in float64.

    CKA(X, Y) = HSIC(X, Y) / sqrt(HSIC(X, X) HSIC(Y, Y)),  HSIC(X, Y) = <H X Xᵀ H, H Y Yᵀ H>_F

The HSIC scale factor cancels. With column-centred features this equals
``||Yᵀ X||²_F / (||Xᵀ X||_F ||Yᵀ Y||_F)``; the feature form is used when both widths are at
most ``n`` and the ``n x n`` Gram form otherwise (same value, less memory).
Deviation: a constant representation (zero HSIC with itself, e.g. channels a defense pruned
to zero) gets CKA 0 instead of the official code's 0/0 = NaN.
"""
from __future__ import annotations

import torch


def _flat(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape (n, d, ...), got {tuple(x.shape)}")
    return x.reshape(len(x), -1).to(torch.float64)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between features ``x`` (n, d1, ...) and ``y`` (n, d2, ...) of the same n
    inputs (extra dims flattened); in [0, 1], 1 for ``x`` against itself."""
    if len(x) != len(y):
        raise ValueError(f"x and y must describe the same inputs, got {len(x)} and {len(y)} rows")
    if len(x) < 2:
        raise ValueError(f"CKA needs at least 2 inputs, got {len(x)}")
    xf = _flat(x, "x")
    yf = _flat(y, "y").to(xf.device)
    xf = xf - xf.mean(0, keepdim=True)
    yf = yf - yf.mean(0, keepdim=True)
    n = len(xf)
    if max(xf.shape[1], yf.shape[1]) <= n:
        cross = (yf.T @ xf).square().sum()
        self_x = (xf.T @ xf).square().sum()
        self_y = (yf.T @ yf).square().sum()
    else:  # column-centred features give centred Grams: H K H = Xc Xcᵀ
        kx, ky = xf @ xf.T, yf @ yf.T
        cross = (kx * ky).sum()
        self_x = kx.square().sum()
        self_y = ky.square().sum()
    denom = (self_x * self_y).sqrt()
    if not float(denom) > 0:
        return 0.0
    return float((cross / denom).clamp(0.0, 1.0))


__all__ = ["linear_cka"]
