"""Backdoor Existence Coefficient (BEC): how much of the backdoored model's backdoor
representation survives in a defended model.

Paper: Zhu, Liang, Wu, "Breaking the False Sense of Security in Backdoor Defense through
Re-Activation Attack", NeurIPS 2024 (official code: ``BEC/analy_backdoor_{acti,cka,plot}.py``).
It is an analysis metric, not an attack: the analyst holds the backdoored model ``f_A``, the
defended models ``f_D``, a clean model ``f_C`` and paired clean/poisoned versions of the same
non-target-class test images (BackdoorBench's ``bd_test``).

1. Backdoor-neuron score (trigger-activation change) on ``f_A``, per output channel ``c`` of
   every conv layer that is neither the stem nor a shortcut (PreAct-ResNet18: the 16 convs
   ``layer{1..4}.{0,1}.conv{1,2}``; hooked at the conv output):
   ``score[c] = mean_n ||o_c(x_bd,n) - o_c(x_cl,n)||_2 / mean_{both halves} ||o(x)||_2``
   (channel norm over H·W, layer norm over C·H·W).
2. On 500 poisoned images, the outputs of the top ``top_ratio`` (default 10 %) channels of each
   layer, flattened to (500, k·H·W), of ``f_A`` and of the other model; linear CKA per layer,
   averaged over the layers: ``S(f)``. ``S(f_A) = 1``.
3. ``"paper"`` normalisation: ``BEC(f_D) = (S(f_D) - S(f_C)) / (S(f_A) - S(f_C))``, so the
   backdoored model is 1 and the clean model 0 (a defended model less similar to ``f_A`` than the
   clean model is gets a negative value; it is not clipped). ``"code"``: the official plot script's min-max
   over ``[S(f_C), S(f_D) for every defense]``, with the backdoored model then set to 1 (the
   maximum is the most similar *defense*, not ``f_A``).

Defaults: 10 % of channels, up to 500 images for the features, 2200 pairs for the scores,
batches of 250 pairs (as the official scripts).
Deviations from the official code:
* the score is one ratio of means over all pairs; the code sums per-batch ratios (batches of
  250 pairs), which equals this up to the number of batches when batch norms agree (the channel
  ranking, which is all BEC uses, is the same in that case);
* ``k = max(1, floor(top_ratio * C))``: the code's ``int(top_ratio * C)``, but at least one
  channel (the code selects none for layers narrower than 1/top_ratio);
* layers found by name (``layer`` in the name, no ``shortcut``), falling back to every
  non-shortcut conv but the first for models without ``layer*`` blocks (VGG);
* a constant representation gets CKA 0 (see ``cka.py``) instead of NaN.
"""
from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..data.bundle import to_float
from ..defenses.tools import capture
from ..defenses.tools import layers as find_layers
from .cka import linear_cka

if TYPE_CHECKING:  # pragma: no cover
    from ..pipeline import AttackResult

NORMALISATIONS = ("paper", "code")


# -- validation -----------------------------------------------------------------------------
def check_options(top_ratio: float, normalisation: str = "paper") -> None:
    """Raise a clear error for an unknown normalisation or a ``top_ratio`` outside (0, 1]."""
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {normalisation!r}; valid choices: {', '.join(NORMALISATIONS)}")
    if isinstance(top_ratio, bool) or not (isinstance(top_ratio, (int, float)) and 0 < top_ratio <= 1):
        raise ValueError(f"top_ratio must be in (0, 1], got {top_ratio!r}")


def _check_batch(batch_size: int) -> None:
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


# -- plumbing -------------------------------------------------------------------------------
@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[nn.Module]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def backdoor_layers(model: nn.Module) -> list[str]:
    """The conv layers BEC looks at: every ``nn.Conv2d`` whose name contains ``layer`` and not
    ``shortcut`` (PreAct-ResNet18: ``layer{1..4}.{0,1}.conv{1,2}``); for a model without such
    names, every non-shortcut conv but the first (the stem)."""
    convs = list(find_layers(model, nn.Conv2d))
    named = [n for n in convs if "layer" in n]
    chosen = named if named else convs[1:]
    if not chosen:
        raise ValueError(f"{type(model).__name__} has no conv layer besides the stem; BEC needs some")
    return chosen


def _resolve_layers(model: nn.Module, layers: Sequence[str] | None) -> list[str]:
    if layers is None:
        return backdoor_layers(model)
    layers = list(layers)
    modules = dict(model.named_modules())
    bad = [n for n in layers if not isinstance(modules.get(n), nn.Conv2d)]
    if not layers or bad:
        raise ValueError(f"layers must name Conv2d modules of {type(model).__name__}; not convs: {bad or '(none given)'}")
    return layers


# -- step 1: backdoor-neuron scores -----------------------------------------------------------
def backdoor_neuron_scores(model: nn.Module, clean_x: torch.Tensor, poisoned_x: torch.Tensor,
                           layers: Sequence[str] | None = None, batch_size: int = 250) -> dict[str, torch.Tensor]:
    """Trigger-activation change of every output channel of ``layers`` (default
    :func:`backdoor_layers`) of the backdoored ``model``, from paired clean/poisoned versions of
    the same images (uint8 or [0, 1]): ``mean_n ||o_c(x_bd) - o_c(x_cl)||_2`` over H·W divided by
    ``mean ||o(x)||_2`` over C·H·W and both halves. Returns ``{layer: Tensor(C)}`` (float32, CPU)."""
    if clean_x.shape != poisoned_x.shape or len(clean_x) < 1:
        raise ValueError("clean_x and poisoned_x must be non-empty paired batches of the same shape, "
                         f"got {tuple(clean_x.shape)} and {tuple(poisoned_x.shape)}")
    _check_batch(batch_size)
    names = _resolve_layers(model, layers)
    device = _device(model)
    num: dict[str, torch.Tensor] = {}
    den: dict[str, torch.Tensor] = {}
    with _eval(model), capture(model, names) as out:
        for start in range(0, len(clean_x), batch_size):
            bd = to_float(poisoned_x[start:start + batch_size].to(device))
            cl = to_float(clean_x[start:start + batch_size].to(device))
            m = len(bd)
            model(torch.cat([bd, cl]))
            for name in names:
                o = out[name].double()
                change = (o[:m] - o[m:]).flatten(2).norm(dim=2).sum(0)  # (C,)
                size = o.flatten(1).norm(dim=1).sum()
                num[name] = num[name] + change if name in num else change
                den[name] = den[name] + size if name in den else size
    n = len(clean_x)
    return {name: ((num[name] / n) / (den[name] / (2 * n)).clamp_min(1e-12)).float().cpu() for name in names}


def top_channels(scores: Mapping[str, torch.Tensor], top_ratio: float = 0.1) -> dict[str, torch.Tensor]:
    """The ``max(1, floor(top_ratio * C))`` highest-scoring channels of every layer."""
    check_options(top_ratio)
    out = {}
    for name, s in scores.items():
        k = max(1, math.floor(top_ratio * len(s) + 1e-9))
        out[name] = torch.topk(s, k).indices
    return out


# -- step 2: features and similarity -----------------------------------------------------------
def layer_features(model: nn.Module, x: torch.Tensor, layers: Sequence[str], batch_size: int = 250,
                   channels: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Conv outputs of ``model`` at ``layers`` for images ``x`` (BEC feeds the poisoned images),
    ``{layer: Tensor(n, C, H, W)}`` on the model's device; ``channels`` keeps only those output
    channels of each layer (so only the top channels are stored)."""
    _check_batch(batch_size)
    names = _resolve_layers(model, layers)
    device = _device(model)
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    with _eval(model), capture(model, names) as out:
        for start in range(0, len(x), batch_size):
            model(to_float(x[start:start + batch_size].to(device)))
            for name in names:
                o = out[name].float()
                if channels is not None:
                    o = o[:, channels[name].to(o.device)]
                parts[name].append(o)
    return {name: torch.cat(p) for name, p in parts.items()}


def _similarity(reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    per_layer = {name: linear_cka(reference[name], other[name]) for name in reference}
    return {"layers": per_layer, "S": sum(per_layer.values()) / len(per_layer)}


def existence_similarity(backdoored: nn.Module, other: nn.Module, poisoned_x: torch.Tensor,
                         scores: Mapping[str, torch.Tensor], top_ratio: float = 0.1,
                         batch_size: int = 250) -> dict[str, Any]:
    """Linear CKA between ``backdoored`` and ``other`` on the top ``top_ratio`` channels (by
    ``scores``) of every scored layer, on the poisoned images: ``{"layers": {layer: cka},
    "S": mean over layers, "k": {layer: channels kept}}``."""
    check_options(top_ratio)
    if len(poisoned_x) < 2:
        raise ValueError(f"need at least 2 poisoned images, got {len(poisoned_x)}")
    top = top_channels(scores, top_ratio)
    names = list(top)
    ref = layer_features(backdoored, poisoned_x, names, batch_size, top)
    res = _similarity(ref, layer_features(other, poisoned_x, names, batch_size, top))
    return {**res, "k": {n: len(i) for n, i in top.items()}}


# -- step 3: BEC -------------------------------------------------------------------------------
def bec(backdoored: nn.Module, defended: Mapping[str, nn.Module], clean_model: nn.Module,
        clean_x: torch.Tensor, poisoned_x: torch.Tensor, top_ratio: float = 0.1,
        normalisation: str = "paper", layers: Sequence[str] | None = None, n_features: int = 500,
        batch_size: int = 250, scores: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """BEC of every defended model. Scores come from all pairs (``clean_x``, ``poisoned_x``) on
    ``backdoored`` (or are given); features from the first ``n_features`` poisoned images.

    Returns ``{"bec": {defense: BEC}, "S": {defense: S}, "S_clean": S(f_C), "S_backdoored": 1,
    "bec_clean", "bec_backdoored", "per_layer": {defense | "clean": {layer: cka}},
    "k": {layer: k}, "scores", "normalisation", "top_ratio", "n_features"}``."""
    check_options(top_ratio, normalisation)
    if not defended:
        raise ValueError("defended must name at least one defended model")
    if not (isinstance(n_features, int) and n_features >= 2):
        raise ValueError(f"n_features must be an integer >= 2, got {n_features!r}")
    if len(poisoned_x) < 2:
        raise ValueError(f"need at least 2 poisoned images, got {len(poisoned_x)}")
    _check_batch(batch_size)
    if scores is None:
        scores = backdoor_neuron_scores(backdoored, clean_x, poisoned_x, layers, batch_size)
    top = top_channels(scores, top_ratio)
    names = list(top)
    x_feat = poisoned_x[:n_features]
    ref = layer_features(backdoored, x_feat, names, batch_size, top)

    cache: dict[int, dict[str, Any]] = {}  # one pass per distinct model object

    def similarity(model: nn.Module) -> dict[str, Any]:
        if id(model) not in cache:
            cache[id(model)] = _similarity(ref, layer_features(model, x_feat, names, batch_size, top))
        return cache[id(model)]

    s_clean = similarity(clean_model)["S"]
    s_def = {name: similarity(m)["S"] for name, m in defended.items()}
    s_backdoored = 1.0
    if normalisation == "paper":
        span = s_backdoored - s_clean
        norm = (lambda s: (s - s_clean) / span) if span > 0 else (lambda s: math.nan)
        bec_clean = 0.0
    else:
        lo = min(s_clean, *s_def.values())
        hi = max(s_clean, *s_def.values())
        norm = (lambda s: (s - lo) / (hi - lo)) if hi > lo else (lambda s: 0.0)
        bec_clean = norm(s_clean)
    return {"bec": {name: norm(s) for name, s in s_def.items()}, "S": s_def, "S_clean": s_clean,
            "S_backdoored": s_backdoored, "bec_clean": bec_clean, "bec_backdoored": 1.0,
            "per_layer": {"clean": similarity(clean_model)["layers"],
                          **{name: similarity(m)["layers"] for name, m in defended.items()}},
            "k": {n: len(i) for n, i in top.items()}, "scores": dict(scores),
            "normalisation": normalisation, "top_ratio": top_ratio, "n_features": len(x_feat)}


def _as_model(obj: Any, what: str) -> nn.Module:
    """A model from a model, an ``AttackResult`` or a ``defend`` (model, row) pair."""
    if isinstance(obj, tuple) and obj and isinstance(obj[0], nn.Module):
        return obj[0]
    model = getattr(obj, "model", obj)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{what} must be a model, an AttackResult or a (model, row) pair, got {type(obj).__name__}")
    return model


def paired_test_images(result: "AttackResult", n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``n`` random non-target test images of the attacked setting as [0, 1] floats,
    clean and with the trigger (the paired ``clean_test``/``bd_test`` of the official code)."""
    if result.attack is None:
        raise ValueError("BEC needs an attacked setting (attack='none' has no trigger)")
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    bundle, attack = result.data, result.attack
    keep = torch.nonzero(attack.test_mask(bundle.test_y)).flatten()
    g = torch.Generator().manual_seed(seed)
    pick = keep[torch.randperm(len(keep), generator=g)[:n].to(keep.device)]
    clean = to_float(bundle.test_x[pick])
    poisoned = torch.cat([attack.apply(clean[i:i + 512]) for i in range(0, len(clean), 512)])
    return clean, poisoned


def bec_for(result: "AttackResult", defended_models: Mapping[str, Any], clean_result: Any,
            n: int = 500, seed: int = 0, n_scores: int = 2200, top_ratio: float = 0.1,
            normalisation: str = "paper", batch_size: int = 250) -> dict[str, Any]:
    """:func:`bec` for an attacked setting: ``result.model`` is the backdoored model,
    ``defended_models`` maps names to defended models (or ``defend``'s (model, row) pairs),
    ``clean_result`` is the clean setting's ``AttackResult`` (or its model). Draws up to
    ``max(n, n_scores)`` paired non-target test images: all of them score the channels, the
    first ``n`` (500, as the paper) give the features."""
    check_options(top_ratio, normalisation)
    if not (isinstance(n, int) and n >= 2) or not (isinstance(n_scores, int) and n_scores >= 1):
        raise ValueError(f"n must be an integer >= 2 and n_scores >= 1, got n={n!r}, n_scores={n_scores!r}")
    models = {name: _as_model(m, f"defended_models[{name!r}]") for name, m in defended_models.items()}
    clean_model = _as_model(clean_result, "clean_result")
    clean_x, poisoned_x = paired_test_images(result, max(n, n_scores), seed)
    scores = backdoor_neuron_scores(result.model, clean_x[:n_scores], poisoned_x[:n_scores], None, batch_size)
    return bec(result.model, models, clean_model, clean_x, poisoned_x, top_ratio, normalisation,
               n_features=n, batch_size=batch_size, scores=scores)


__all__ = ["NORMALISATIONS", "backdoor_layers", "backdoor_neuron_scores", "bec", "bec_for", "check_options",
           "existence_similarity", "layer_features", "paired_test_images", "top_channels"]
