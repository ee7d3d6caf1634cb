"""What the BatchNorm-channel defenses (ANP, RNP, CLP, EP, BNP) share; not a defense itself.

- :class:`ChannelMasks` attaches a multiplicative mask ``m`` (init 1) to the scale of every
  ``BatchNorm2d`` through forward hooks, and optionally ANP's neuron perturbations: with
  them switched on a BN computes ``gamma * (m + delta) * x_hat + beta * (1 + xi)``. The
  model's weights are never touched, so one copy serves every step.
- :func:`bn_input_stats` / :func:`bn_input_maxima`: per-channel statistics of every BN's
  *input* (the pre-activation) over a set of images, accumulated batch by batch.
- :func:`conv_bn_pairs`: which conv produces each BN's input (found by tracing one forward).
- :func:`prune` writes the pruning into the weights (``tools.zero_channels``, or the BN
  scale alone as ANP/RNP do), :func:`outliers` / :func:`below` pick channels, and
  :func:`prune_by_clean_rule` chooses a pruning level with ``tools.largest_within_drop``.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Sequence

import torch
from torch import nn

from ..data.bundle import to_float
from ..models import clone
from . import tools

Channels = dict[str, torch.Tensor]  # BN layer name -> bool mask over its channels


def bn_layers(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    """Every BatchNorm2d of ``model`` (shortcut ones too), in forward order."""
    found = tools.layers(model, nn.BatchNorm2d, shortcuts=True)
    if not found:
        raise ValueError(f"{type(model).__name__} has no BatchNorm2d layer to mask or prune")
    return found


class ChannelMasks(contextlib.AbstractContextManager):
    """Per-channel masks on every BatchNorm2d output, active inside ``with``.

    ``mask[name]`` is a leaf tensor in [0, 1] (init 1) multiplying the BN scale gamma.
    With ``noise=True`` the ANP perturbations ``delta[name]`` (added to the mask, i.e. a
    relative change of gamma) and ``xi[name]`` (relative change of beta) exist, and apply
    while ``perturbed`` is True.
    """

    def __init__(self, model: nn.Module, *, noise: bool = False):
        self.model = model
        self.bns = bn_layers(model)
        device = next(model.parameters()).device
        zeros = {n: torch.zeros(bn.num_features, device=device) for n, bn in self.bns.items()}
        self.mask = {n: torch.ones_like(z).requires_grad_() for n, z in zeros.items()}
        self.delta = {n: z.clone().requires_grad_() for n, z in zeros.items()} if noise else {}
        self.xi = {n: z.clone().requires_grad_() for n, z in zeros.items()} if noise else {}
        self.perturbed = False
        self._handles: list = []

    def _hook(self, name: str):
        def hook(bn: nn.BatchNorm2d, _args, out: torch.Tensor) -> torch.Tensor:
            scale = self.mask[name] + self.delta[name] if self.perturbed else self.mask[name]
            if bn.bias is None:
                return out * scale.view(1, -1, 1, 1)
            beta = bn.bias.view(1, -1, 1, 1)
            shift = beta * (1 + self.xi[name].view(1, -1, 1, 1)) if self.perturbed else beta
            return (out - beta) * scale.view(1, -1, 1, 1) + shift
        return hook

    def __enter__(self) -> "ChannelMasks":
        self._handles = [bn.register_forward_hook(self._hook(n)) for n, bn in self.bns.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def masks(self) -> list[torch.Tensor]:
        return list(self.mask.values())

    def noises(self) -> list[torch.Tensor]:
        return list(self.delta.values()) + list(self.xi.values())

    @torch.no_grad()
    def reset_noise(self, eps: float, generator: torch.Generator) -> None:
        """ANP's random start: delta, xi ~ U(-eps, eps)."""
        for t in self.noises():
            t.copy_(torch.rand(t.shape, generator=generator).to(t.device) * 2 * eps - eps)

    @torch.no_grad()
    def clip_(self, eps: float | None = None) -> None:
        """Masks back into [0, 1]; perturbations into [-eps, eps] when eps is given."""
        for m in self.masks():
            m.clamp_(0, 1)
        if eps is not None:
            for t in self.noises():
                t.clamp_(-eps, eps)

    def values(self) -> dict[str, torch.Tensor]:
        """The learned mask values, detached."""
        return {n: m.detach().clone() for n, m in self.mask.items()}


def frozen(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters take no gradient (mask learning only)."""
    copy = clone(model)
    for p in copy.parameters():
        p.requires_grad_(False)
    return copy


@torch.no_grad()
def bn_input_stats(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and (biased) variance of every BN's input over the images ``x``
    (eval mode), accumulated over batches: name -> (mean [C], var [C])."""
    names = list(bn_layers(model))
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    squares: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {n: 0 for n in names}  # values per channel (layers differ in spatial size)
    with tools.capture(model, names, inputs=True) as out:
        for start in range(0, len(x), batch_size):
            model(to_float(x[start:start + batch_size]))
            for n in names:
                a = out[n].double()
                sums[n] = sums.get(n, 0) + a.sum((0, 2, 3))
                squares[n] = squares.get(n, 0) + a.square().sum((0, 2, 3))
                counts[n] += a[:, 0].numel()
    model.train(was_training)
    stats = {}
    for n in names:
        mean = sums[n] / counts[n]
        stats[n] = (mean.float(), (squares[n] / counts[n] - mean.square()).clamp_min(0).float())
    return stats


@torch.no_grad()
def bn_input_maxima(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Per sample and channel, the spatial maximum of every BN's input: name -> [C, N]."""
    names = list(bn_layers(model))
    was_training = model.training
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    with tools.capture(model, names, inputs=True) as out:
        for start in range(0, len(x), batch_size):
            model(to_float(x[start:start + batch_size]))
            for n in names:
                parts[n].append(out[n].float().flatten(2).amax(-1))
    model.train(was_training)
    return {n: torch.cat(p).T for n, p in parts.items()}


@torch.no_grad()
def conv_bn_pairs(model: nn.Module, in_channels: int, size: int = 32) -> dict[str, str]:
    """BN name -> name of the Conv2d whose output *is* that BN's input (found by tracing
    one forward of a dummy input: no data). A BN fed by anything else (a residual sum, a
    pooling) has no pair: in a pre-activation ResNet that is every block's ``bn1`` except
    the first one's (``conv1 -> layer1.0.bn1``), while ``layerX.Y.conv1 -> layerX.Y.bn2``."""
    convs = tools.layers(model, nn.Conv2d, shortcuts=True)
    bns = bn_layers(model)
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # the tensors are kept alive so no id is reused
    pairs: dict[str, str | None] = {}
    handles = [m.register_forward_hook(lambda _m, _a, out, n=n: produced.__setitem__(id(out), (n, out)))
               for n, m in convs.items()]
    handles += [m.register_forward_hook(
        lambda _m, args, _o, n=n: pairs.__setitem__(n, produced.get(id(args[0]), (None,))[0])) for n, m in bns.items()]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(2, in_channels, size, size, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {bn: conv for bn, conv in pairs.items() if conv is not None}


def outliers(scores: dict[str, torch.Tensor], u: float, *, low: bool = False) -> Channels:
    """Per layer, channels whose score is above ``mean + u * std`` of the layer's scores
    (below ``mean - u * std`` with ``low=True``); the rule of CLP, EP and BNP."""
    picked = {}
    for name, s in scores.items():
        s = torch.nan_to_num(s.float(), nan=0.0)
        bar = s.mean() - u * s.std() if low else s.mean() + u * s.std()
        picked[name] = s < bar if low else s > bar
    return picked


def below(values: dict[str, torch.Tensor], threshold: float) -> Channels:
    """Channels whose mask value is ``<= threshold`` (ANP/RNP pruning by threshold; a
    threshold below 0 prunes nothing)."""
    return {n: v <= threshold for n, v in values.items()}


def smallest(values: dict[str, torch.Tensor], count: int) -> Channels:
    """The ``count`` channels with the smallest mask values over all layers (pruning by number)."""
    names = list(values)
    flat = torch.cat([values[n].flatten() for n in names])
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[flat.argsort()[:max(0, min(count, len(flat)))]] = True
    return dict(zip(names, chosen.split([values[n].numel() for n in names])))


def count(channels: Channels) -> int:
    return int(sum(int(c.sum()) for c in channels.values()))


@torch.no_grad()
def prune(model: nn.Module, channels: Channels, *, keep_bias: bool = False) -> nn.Module:
    """Write the pruning of ``channels`` into ``model``'s weights (in place) and return it.
    By default a pruned channel's BN weight and bias are zeroed (``tools.zero_channels``);
    ``keep_bias=True`` zeroes only the BN scale, so the channel outputs its constant bias
    (ANP and RNP prune so)."""
    modules = dict(model.named_modules())
    for name, chosen in channels.items():
        idx = chosen.nonzero().flatten()
        if len(idx) == 0:
            continue
        if keep_bias:
            modules[name].weight[idx.to(modules[name].weight.device)] = 0
        else:
            tools.zero_channels(model, name, idx)
    return model


def prune_by_clean_rule(model: nn.Module, select, levels: Sequence, clean, *, max_drop: float = 0.1,
                        keep_bias: bool = False) -> tuple[nn.Module, object, list[dict]]:
    """Prune a copy of ``model`` at each level (``select(level) -> Channels``), in increasing
    strength, and keep the strongest whose accuracy on the defender's clean data stays
    within a relative ``max_drop`` of the unpruned model's (``tools.largest_within_drop``).
    The unpruned model is tried first (level ``None``), so if even the first level fails
    the rule nothing is pruned. Returns (pruned copy, level, trace); the trace rows also
    give the number of pruned channels."""
    reference = tools.accuracy(model, clean)
    counts: dict = {None: 0}

    def candidate(level):
        if level is None:  # the unpruned model comes first, so a failing first level is never forced
            return clone(model)
        channels = select(level)
        counts[level] = count(channels)
        return prune(clone(model), channels, keep_bias=keep_bias)

    pruned, level, trace = tools.largest_within_drop([None, *levels], candidate, clean, reference, max_drop)
    for row in trace:
        row["pruned"] = counts[row["level"]]
    return pruned, level, trace


def thresholds(maximum: float, step: float) -> list[float]:
    """0, step, ..., maximum (BackdoorBench's ``pruning_max`` / ``pruning_step`` sweep)."""
    n = int(round(maximum / step))
    return [round(i * step, 10) for i in range(n + 1)]


def check_range(name: str, value: float, low: float, high: float, *, low_open: bool = False,
                high_open: bool = False) -> None:
    """Raise ValueError naming the valid range unless low <(=) value <(=) high."""
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (ok_low and ok_high):
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{name} must be in {lo}{low}, {high}{hi}, got {value!r}")


def infinite_batches(clean, batch_size: int, generator: torch.Generator) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled batches of the clean set, pass after pass (ANP samples ``nb_iter`` batches)."""
    while True:
        yielded = False
        for batch in tools.batches(clean, batch_size, generator):
            yielded = True
            yield batch
        if not yielded:
            raise ValueError("the clean set needs at least 2 samples")
