"""Building blocks shared by the defenses: layer lookup, activation capture, channel
pruning that survives a save (it is written into the weights), the defender's
clean-data accuracy, and the clean-data selection rule for pruning levels.

Every choice here uses only the defender's data: a defense never sees the test set
or the poisoned samples.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import torch
from torch import nn

from ..data.bundle import TensorBundle, to_float
from ..train import predict

T = TypeVar("T")


def layers(model: nn.Module, kind: type | tuple[type, ...], *, shortcuts: bool = False) -> dict[str, nn.Module]:
    """Named submodules of ``kind`` in forward order (shortcut convs left out unless asked)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, kind) and (shortcuts or "shortcut" not in name)}


def last_conv_block(model: nn.Module) -> str:
    """The module whose output feeds the classifier's pooling: ``layer4`` for
    PreAct-ResNet18 (BackdoorBench's FP/NAD layer), ``features`` for VGG."""
    for name in ("layer4", "features"):
        if hasattr(model, name):
            return name
    raise ValueError(f"no known last block in {type(model).__name__}; expected layer4 or features")


@contextlib.contextmanager
def capture(model: nn.Module, names: Sequence[str], *, inputs: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs (or inputs) of the named modules during forward passes inside
    the ``with`` block; ``out[name]`` holds the latest batch's tensor (gradients kept)."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"no module named {missing} in {type(model).__name__}")
    out: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def hook(_m, args, result, name=name):
            out[name] = args[0] if inputs else result
        handles.append(modules[name].register_forward_hook(hook))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def activations(model: nn.Module, x: torch.Tensor, name: str, batch_size: int = 512, *,
                inputs: bool = False) -> torch.Tensor:
    """The named module's output (or input) for every image of ``x`` (uint8 or [0,1]), in eval mode."""
    was_training = model.training
    model.eval()
    parts = []
    with capture(model, [name], inputs=inputs) as out:
        for start in range(0, len(x), batch_size):
            model(to_float(x[start:start + batch_size]))
            parts.append(out[name].float())
    model.train(was_training)
    return torch.cat(parts)


@torch.no_grad()
def zero_channels(model: nn.Module, name: str, channels: torch.Tensor | Iterable[int]) -> None:
    """Prune output channels of a Conv2d/BatchNorm2d (or input features of a Linear) by
    writing zeros into its weights, so the pruning is part of the saved state dict."""
    module = dict(model.named_modules())[name]
    idx = torch.as_tensor(list(channels) if not isinstance(channels, torch.Tensor) else channels,
                          dtype=torch.int64, device=next(module.parameters()).device)
    if isinstance(module, nn.Linear):
        module.weight[:, idx] = 0
        return
    if not isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
        raise TypeError(f"cannot prune channels of {type(module).__name__} {name!r}")
    module.weight[idx] = 0
    if module.bias is not None:
        module.bias[idx] = 0


def accuracy(model: nn.Module, bundle: TensorBundle, split: str = "train") -> float:
    """Accuracy on a bundle's split; for the defender's clean subset this is ``train``."""
    x, y = getattr(bundle, f"{split}_x"), getattr(bundle, f"{split}_y")
    return float((predict(model, x) == y).float().mean())


def split_clean(clean: TensorBundle, val_fraction: float, seed: int = 0) -> tuple[TensorBundle, TensorBundle]:
    """Split the defender's clean subset into (fit part, held-out part), at least one sample each."""
    n = len(clean.train_y)
    if n < 2:
        raise ValueError(f"need at least 2 clean samples to hold some out, got {n}")
    k = min(n - 1, max(1, round(n * val_fraction)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return clean.subset(order[k:].sort().values), clean.subset(order[:k].sort().values)


def largest_within_drop(levels: Sequence[T], candidate: Callable[[T], nn.Module], clean: TensorBundle,
                        reference_acc: float, max_drop: float = 0.1) -> tuple[nn.Module, T, list[dict]]:
    """The clean-data selection rule for pruning: try ``levels`` in increasing strength and
    keep the strongest whose accuracy on the defender's clean data stays within a relative
    drop of ``max_drop`` from ``reference_acc`` (BackdoorBench's ``acc_ratio``, but measured
    on clean data the defender holds instead of the test set). The first level is kept if
    none qualifies. Returns (model, level, trace of every level tried)."""
    best = None
    trace = []
    for level in levels:
        model = candidate(level)
        acc = accuracy(model, clean)
        ok = acc >= reference_acc * (1 - max_drop)
        trace.append({"level": level, "clean_acc": acc, "kept": ok})
        if ok or best is None:
            best = (model, level)
        if not ok:
            break
    return best[0], best[1], trace


def batches(bundle: TensorBundle, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One shuffled pass over a bundle's training split as float batches in [0,1] on its
    device, for defenses whose inner loop is not ``train.fit``'s (masks, adversaries)."""
    n = len(bundle.train_y)
    order = torch.randperm(n, generator=generator).to(bundle.device)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if len(idx) >= 2:
            yield to_float(bundle.train_x[idx]), bundle.train_y[idx]
