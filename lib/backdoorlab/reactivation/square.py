"""Query-based re-activation: a universal Square Attack that wakes a purified model's backdoor
from its output probabilities alone (Zhu, Liang, Wu, "Breaking the False Sense of Security
in Backdoor Defense through Re-Activation Attack", NeurIPS 2024, its black-box attack "BBA";
official code ``reattack/bb_attack.py`` + ``utils/reattack_utils/square_attack.py``, built on
Andriushchenko, Croce, Flammarion, Hein, "Square Attack: a query-efficient black-box
adversarial attack via random search", ECCV 2020).

Threat model: as for the white-box attack (the attacker knows the trigger and holds poisoned
samples) but the purified model is a black box that returns class probabilities for a batch
of images; the attacker pays one query per forward pass of its batch.

Algorithm (L-inf, score-based, targeted): ``delta`` (shape ``(1, C, H, W)``) starts as
vertical stripes, every column of every channel ``+-eps`` at random. Each iteration picks a
random square window whose side is ``round(sqrt(p * H * W))`` (clipped to ``[1, H - 1]``) with
``p`` from the Square Attack's piecewise-constant schedule (``p_init`` halved at 10, 50, 200,
500, 1000, 2000, 4000, 6000, 8000 of 10000 iterations, rescaled to ``max_queries``), sets the
window of every channel to a random ``+-eps`` (resampled, as in the original, so that the
window actually changes), queries the model, and keeps the change if the summed targeted loss
``sum_batch -log p_target`` decreased. Stops after ``max_queries`` queries (the initial
evaluation is one) or, checked every ``STOP_CHECK_EVERY`` queries, once the attacker's batch
ASR reaches ``early_stop_asr``. Defaults (README): eps 0.05 L-inf, 10000 queries, ``p_init``
0.1, target loss ``cross_entropy``, batch 500 of 1000 poisoned training samples, early stop at
batch ASR > 0.99.

Deviations from the official code (documented choices):

* ONE attack on up to ``batch_size`` of the attacker's samples (the first ones given), not one
  independent attack (``np.random.seed(0)`` each) per 500-sample batch whose last delta wins;
* ``delta`` in [0, 1] pixel units and inside the budget at every query (every entry is exactly
  ``+-eps``); the code takes ``delta`` in normalised units from the first image, so its
  queries can leave the budget until the final clamp;
* the model is reached only through ``probabilities`` (softmax under ``torch.no_grad``), so
  no gradient can leak; the loss is ``-log(max(p_t, 1e-30))``;
* the no-op check compares the window of ``delta`` itself (the code indexes image 1 of the
  batch, mixing units); the redraw is done in one draw (uniform over the sign vectors that
  change a constant window) instead of a rejection loop, so it needs no host sync;
* the accept test runs on the device (``torch.where``); the early stop looks at the ASR of the
  *current* delta every ``STOP_CHECK_EVERY`` queries (the code keeps the best ASR ever
  accepted and checks every query), and uses ``>=`` (so ``early_stop_asr=1.0`` means perfect);
* the target may be one label per sample (all-to-all attacks).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .common import check_budget

PAPER_EPS = 0.05
PAPER_MAX_QUERIES = 10000  # n_iter, per batch in the code
PAPER_P_INIT = 0.1
PAPER_BATCH_SIZE = 500
STOP_CHECK_EVERY = 10  # queries between host syncs for the early-stop rule
_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000, 10000)  # p_init / 2**k after the k-th bound


@dataclass
class SquareLog:
    """What the search did: ``queries`` (forward passes of the attacker's batch, the initial
    evaluation included), ``loss`` (the accepted summed loss after every query), ``accepted``
    (how many proposals were kept), ``asr`` (the attacker's batch ASR of the returned delta)
    and whether it ``stopped_early``."""
    queries: int
    loss: list[float] = field(default_factory=list)
    accepted: int = 0
    asr: float = 0.0
    stopped_early: bool = False


def p_schedule(p_init: float, it: int, n_iters: int) -> float:
    """The Square Attack's fraction of pixels changed at iteration ``it`` of ``n_iters``
    (the 10000-iteration piecewise schedule, rescaled)."""
    it = int(it / n_iters * 10000)
    for k, upper in enumerate(_SCHEDULE):
        if it <= upper:
            return p_init / 2 ** k
    return p_init


def window_side(p: float, h: int, w: int) -> int:
    """The side of a square holding a fraction ``p`` of the ``h x w`` pixels, in ``[1, h - 1]``."""
    return min(max(int(round((p * h * w) ** 0.5)), 1), h - 1)


def probabilities(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The black box: ``model``'s softmax outputs, without gradients."""

    def query(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x).float().softmax(1)

    return query


def square_reactivation(model: nn.Module, x_poisoned: torch.Tensor, target: int | torch.Tensor, *,
                        norm: str = "linf", eps: float = PAPER_EPS, max_queries: int = PAPER_MAX_QUERIES,
                        p_init: float = PAPER_P_INIT, batch_size: int = PAPER_BATCH_SIZE, seed: int = 0,
                        early_stop_asr: float | None = 0.99) -> tuple[torch.Tensor, SquareLog]:
    """BBA: one universal L-inf ``delta`` (``(1, C, H, W)``, every entry ``+-eps``, on
    ``x_poisoned``'s device) found with at most ``max_queries`` probability queries of
    ``model`` on up to ``batch_size`` poisoned images towards ``target`` (an int or one label
    per sample); returns it with its ``SquareLog``. ``early_stop_asr=None`` never stops early."""
    check_budget(norm, eps)
    if norm != "linf":
        raise ValueError(f"square_reactivation supports norm 'linf' only, got {norm!r}; valid choices: linf")
    if isinstance(max_queries, bool) or not isinstance(max_queries, int) or max_queries < 1:
        raise ValueError(f"max_queries must be an int >= 1, got {max_queries!r}")
    if not 0 < p_init <= 1:
        raise ValueError(f"p_init must be in (0, 1], got {p_init}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if early_stop_asr is not None and not 0 < early_stop_asr <= 1:
        raise ValueError(f"early_stop_asr must be in (0, 1] or None, got {early_stop_asr}")
    if x_poisoned.dim() != 4 or len(x_poisoned) == 0 or not x_poisoned.is_floating_point():
        raise ValueError(f"x_poisoned must be a non-empty (N, C, H, W) batch of [0, 1] floats, "
                         f"got {x_poisoned.dtype} of shape {tuple(x_poisoned.shape)}")
    n = min(batch_size, len(x_poisoned))
    if isinstance(target, torch.Tensor) and target.dim() > 0:
        if target.shape != (len(x_poisoned),):
            raise ValueError(f"target must be an int or one label per sample ({len(x_poisoned)}), "
                             f"got shape {tuple(target.shape)}")
        t = target[:n].to(device=x_poisoned.device, dtype=torch.long)
    else:
        t = torch.full((n,), int(target), dtype=torch.long, device=x_poisoned.device)
    x = x_poisoned[:n]
    device = x.device
    _, c, h, w = x.shape

    was_training = model.training
    query = probabilities(model)

    def evaluate(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = query((x + d).clamp(0, 1))
        loss = -p.gather(1, t[:, None]).clamp_min(1e-30).log().sum()
        return loss, (p.argmax(1) == t).float().mean()

    # All randomness drawn up front on a CPU generator: windows are host ints (no syncs),
    # sign codes go to the device in one copy.
    g = torch.Generator().manual_seed(seed)
    stripes = torch.randint(0, 2, (1, c, 1, w), generator=g).float() * 2 - 1
    iters = max_queries - 1
    sides = [window_side(p_schedule(p_init, i, max_queries), h, w) for i in range(iters)]
    u = torch.rand(iters, 2, generator=g)
    corners = [(int(a * (h - s)), int(b * (w - s))) for (a, b), s in zip(u.tolist(), sides)]
    n_codes = 2 ** c
    any_code = torch.randint(0, n_codes, (iters,), generator=g).to(device)
    other_code = (1 + torch.randint(0, n_codes - 1, (iters,), generator=g)).to(device)
    bits = 2 ** torch.arange(c, device=device)

    delta = (stripes * eps).expand(1, c, h, w).to(device=device, dtype=x.dtype).contiguous()
    curve = torch.empty(max_queries, device=device)
    accepted = torch.zeros((), dtype=torch.long, device=device)
    stopped = False
    model.eval()
    try:
        best_loss, best_asr = evaluate(delta)
        curve[0] = best_loss
        queries = 1
        for i in range(iters):
            if early_stop_asr is not None and (queries - 1) % STOP_CHECK_EVERY == 0 \
                    and bool(best_asr >= early_stop_asr):  # the only host sync, every STOP_CHECK_EVERY queries
                stopped = True
                break
            s, (r, q) = sides[i], corners[i]
            window = delta[0, :, r:r + s, q:q + s]
            current = ((window[:, 0, 0] > 0).long() * bits).sum()
            constant = (window == window[:, :1, :1]).all()
            code = torch.where(constant, current ^ other_code[i], any_code[i])
            signs = ((code // bits) % 2).to(x.dtype) * 2 - 1
            candidate = delta.clone()
            candidate[0, :, r:r + s, q:q + s] = (signs * eps).view(c, 1, 1)
            loss, asr = evaluate(candidate)
            queries += 1
            better = loss < best_loss
            delta = torch.where(better, candidate, delta)
            best_loss = torch.where(better, loss, best_loss)
            best_asr = torch.where(better, asr, best_asr)
            accepted += better.long()
            curve[i + 1] = best_loss
    finally:
        model.train(was_training)
    log = SquareLog(queries=queries, loss=curve[:queries].tolist(), accepted=int(accepted), asr=float(best_asr),
                    stopped_early=stopped)
    return delta, log


__all__ = ["PAPER_MAX_QUERIES", "SquareLog", "p_schedule", "probabilities", "square_reactivation", "window_side"]
