"""Linear mode connectivity (LMC) between two models of one architecture, e.g. the
backdoored model (t = 0) and its purified version (t = 1): accuracy and ASR along the
straight line ``theta(t) = (1 - t) * theta_a + t * theta_b``.

Paper: Min, Qin, Zhang, Shen, Cheng, "Uncovering, Explaining, and Mitigating the
Superficial Safety of Backdoor Defense", NeurIPS 2024 (Sec. 4, the LMC figures: backdoor
error 1 - ASR along the path from the backdoored to the purified model; EP and PAM keep it
high along the whole path, other defenses fall back to the backdoored basin quickly).
The official repository has no LMC script, and how the paper treats BatchNorm statistics
along the path is not known; both usual choices are offered:

- ``bn="interpolate"``: the running mean/var are interpolated like the weights;
- ``bn="recompute"``: at each ``t`` they are re-estimated on clean training images
  (a cumulative average over one pass, no augmentation), as in the mode-connectivity
  literature.

Integer buffers (BN's ``num_batches_tracked``) are taken from ``model_a``.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from .. import data, metrics
from ..data.bundle import TensorBundle, to_float
from ..models import clone

if TYPE_CHECKING:  # pragma: no cover
    from ..pipeline import AttackResult

BN_MODES = ("interpolate", "recompute")


def _check_pair(model_a: nn.Module, model_b: nn.Module) -> tuple[dict, dict]:
    sa, sb = model_a.state_dict(), model_b.state_dict()
    if type(model_a) is not type(model_b) or sa.keys() != sb.keys():
        raise ValueError(f"the models must share one architecture, got {type(model_a).__name__} and "
                         f"{type(model_b).__name__} with {len(sa)} and {len(sb)} state entries")
    for k in sa:
        if sa[k].shape != sb[k].shape:
            raise ValueError(f"state entry {k!r} has shape {tuple(sa[k].shape)} in model_a, "
                             f"{tuple(sb[k].shape)} in model_b")
    return sa, sb


def _check_t(t: float) -> float:
    t = float(t)
    if not math.isfinite(t):
        raise ValueError(f"t must be a finite number, got {t}")
    return t


def interpolate(model_a: nn.Module, model_b: nn.Module, t: float) -> nn.Module:
    """A new model with ``(1 - t) * a + t * b`` for every floating parameter and floating
    buffer (BN running statistics) and ``model_a``'s integer buffers. ``t = 0`` and
    ``t = 1`` give the endpoints exactly (``torch.lerp``); ``t`` outside [0, 1]
    extrapolates. Neither input is modified."""
    t = _check_t(t)
    sa, sb = _check_pair(model_a, model_b)
    out = clone(model_a)
    mixed = {k: torch.lerp(a, sb[k].to(a.device, a.dtype), t) if a.is_floating_point() else a.clone()
             for k, a in sa.items()}
    out.load_state_dict(mixed)
    return out.eval()


@torch.no_grad()
def recompute_bn(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> nn.Module:
    """Re-estimate every BatchNorm layer's running mean/var of ``model`` (in place) as the
    cumulative average over one pass of ``images`` (uint8 or [0, 1] floats)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    if len(images) < 2:
        raise ValueError(f"re-estimating BatchNorm statistics needs >= 2 images, got {len(images)}")
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
        m.train()
    try:
        for start in range(0, len(images), batch_size):
            xb = to_float(images[start:start + batch_size])
            if len(xb) > 1:
                model(xb)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    return model


def path_metrics(model_a: nn.Module, model_b: nn.Module, result: "AttackResult",
                 ts: Sequence[float] | torch.Tensor | None = None, bn: str = "interpolate",
                 clean: TensorBundle | None = None, batch_size: int = 1024) -> list[dict[str, Any]]:
    """ACC, ASR and RA (``metrics.evaluate`` on the setting's test sets) of
    ``interpolate(model_a, model_b, t)`` for each ``t`` of ``ts`` (default 0, 0.1, ..., 1).

    ``bn="recompute"`` re-estimates BatchNorm statistics at each ``t`` on the training
    images of ``clean`` (default: the defender's 5 % clean subset of the setting); with
    ``bn="interpolate"`` the endpoints are exactly the two models."""
    if bn not in BN_MODES:
        raise ValueError(f"unknown bn {bn!r}; valid choices: {', '.join(BN_MODES)}")
    if result.attack is None:
        raise ValueError("path_metrics needs an attacked setting (ASR needs a trigger)")
    ts = torch.linspace(0, 1, 11) if ts is None else ts
    ts = [_check_t(t) for t in (ts.tolist() if isinstance(ts, torch.Tensor) else ts)]
    if not ts:
        raise ValueError("ts must hold at least one value")
    _check_pair(model_a, model_b)
    images = None
    if bn == "recompute":
        if clean is None:
            idx = data.clean_subset(result.data, 0.05, seed=result.setting.seed)
            clean = result.data.subset(idx)
        images = clean.train_x.to(result.data.device)
    rows = []
    for t in ts:
        model = interpolate(model_a, model_b, t).to(result.data.device)
        if images is not None:
            recompute_bn(model, images)
        scores = metrics.evaluate(model, result.data, result.attack, batch_size)
        rows.append({"t": t, "acc": scores["acc"], "asr": scores["asr"], "ra": scores["ra"]})
    return rows


__all__ = ["BN_MODES", "interpolate", "recompute_bn", "path_metrics"]
