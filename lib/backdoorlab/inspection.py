"""Looking inside a backdoored model: the analyses BackdoorBench ships next to its
benchmark (Wu et al., NeurIPS 2022 Datasets and Benchmarks, "BackdoorBench"), as numbers
only (the plots are in :mod:`backdoorlab.figures`).

- ``features`` / ``tsne_embedding``: penultimate features and their t-SNE map; poisoned
  inputs tend to form their own cluster next to the target class;
- ``grad_cam``: Grad-CAM heat maps (Selvaraju et al., ICCV 2017); on poisoned inputs a
  backdoored model tends to look at the trigger;
- ``neuron_activation``: mean activation per channel for clean vs poisoned inputs; a few
  channels fire for the trigger only;
- ``loss_landscape``: loss and accuracy along random filter-normalised directions (Li et
  al., NeurIPS 2018, "Visualizing the Loss Landscape of Neural Nets");
- ``confusion_matrix``: prediction counts per (true, predicted) class.

These look at triggered test images, which no defense may do: they are for analysis.
Every function works in batches on the model's device, in eval mode, and restores the
model's mode (and, for the loss landscape, its weights) afterwards.

>>> frame = inspection.tsne_embedding(model, clean_x, poisoned_x, seed=0)
>>> maps = inspection.grad_cam(model, poisoned_x)          # float[N, H, W] in [0, 1]
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .data.bundle import to_float


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside the block; the previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _batches(x: torch.Tensor, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """``x`` (uint8 or [0, 1] floats) as float batches on ``device``."""
    for start in range(0, len(x), batch_size):
        yield to_float(x[start:start + batch_size].to(device))


def _check_images(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{name} must be images [N, C, H, W] (uint8 or floats in [0, 1]), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def _module(model: nn.Module, layer: str) -> nn.Module:
    modules = dict(model.named_modules())
    if layer not in modules or layer == "":
        choices = [n for n, m in modules.items() if n and (n.count(".") <= 1 or isinstance(m, nn.Conv2d))]
        raise ValueError(f"no layer {layer!r} in {type(model).__name__}; valid choices include: {', '.join(choices)}")
    return modules[layer]


def default_layer(model: nn.Module) -> str:
    """The last convolutional block, whose output the classifier pools: ``layer4`` for
    PreAct-ResNet18, and for VGG19-BN the last ReLU of ``features`` (before the final
    max-pool, which leaves 1x1 maps on small images)."""
    if hasattr(model, "layer4"):
        return "layer4"
    if isinstance(getattr(model, "features", None), nn.Sequential):
        relus = [i for i, m in enumerate(model.features) if isinstance(m, nn.ReLU)]
        if relus:
            return f"features.{relus[-1]}"
    raise ValueError(f"no known last conv block in {type(model).__name__} (expected layer4 or features); pass layer=")


def grad_cam_layer(model: nn.Module) -> str:
    """Grad-CAM's default layer: the output of the first block of the last stage,
    ``layer4.0`` (4x4 maps on 28x28 and 32x32 images, like ``layer4``) for PreAct-ResNet18;
    :func:`default_layer` for other models. The last block's own output feeds the
    pooling and the linear layer directly, so Grad-CAM there reduces to the class
    activation map of the linear read-out, which in BackdoorBench's PreAct-ResNet (no
    BN/ReLU before the pooling) comes out diffuse: on BadNets mnist5k models the trigger
    window ranks about in the middle of all windows at ``layer4`` and near the top at ``layer4.0``."""
    stage = getattr(model, "layer4", None)
    if isinstance(stage, nn.Sequential) and len(stage) >= 2:
        return "layer4.0"
    return default_layer(model)


def _num_classes(model: nn.Module) -> int:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no linear classifier to read the class count from")
    return linears[-1].out_features


@torch.no_grad()
def features(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Penultimate features ``model.embed(model.normalize(x))`` of images ``x`` (uint8 or
    [0, 1] floats), float32 ``[N, D]`` on the model's device."""
    _check_images(x)
    _check_batch_size(batch_size)
    device = _device(model)
    with _eval(model):
        parts = [model.embed(model.normalize(xb)).float() for xb in _batches(x, batch_size, device)]
    return torch.cat(parts) if parts else torch.empty(0, 0, device=device)


def _sample(n_total: int, n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(n_total, generator=generator)[:n].sort().values


def tsne_embedding(model: nn.Module, clean_x: torch.Tensor, poisoned_x: torch.Tensor,
                   clean_y: torch.Tensor | None = None, poisoned_y: torch.Tensor | None = None,
                   n: int = 250, seed: int = 0, perplexity: float = 30.0, batch_size: int = 512) -> pd.DataFrame:
    """A 2-D t-SNE map (scikit-learn, ``init="pca"``, ``random_state=seed``) of the
    penultimate features of up to ``n`` clean and ``n`` poisoned images (a seeded sample;
    ``n`` keeps the cost to seconds, t-SNE grows faster than linearly with the points).

    Returns one row per point: ``x``, ``y``, ``group`` (``clean`` / ``poisoned``),
    ``predicted`` (the model's class) and ``label`` (the true class from ``clean_y`` /
    ``poisoned_y``; the predicted class where they are not given)."""
    from sklearn.manifold import TSNE

    _check_images(clean_x, "clean_x")
    _check_images(poisoned_x, "poisoned_x")
    for name, x, y in (("clean_y", clean_x, clean_y), ("poisoned_y", poisoned_x, poisoned_y)):
        if y is not None and tuple(y.shape) != (len(x),):
            raise ValueError(f"{name} must have shape ({len(x)},), got {tuple(y.shape)}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if perplexity <= 0:
        raise ValueError(f"perplexity must be > 0, got {perplexity}")
    g = torch.Generator().manual_seed(seed)
    keep_c, keep_p = _sample(len(clean_x), n, g), _sample(len(poisoned_x), n, g)
    if len(keep_c) + len(keep_p) < 3:
        raise ValueError("t-SNE needs at least 3 images in all")
    x = torch.cat([to_float(clean_x[keep_c.to(clean_x.device)].cpu()),
                   to_float(poisoned_x[keep_p.to(poisoned_x.device)].cpu())])
    feats = features(model, x, batch_size)
    with _eval(model), torch.no_grad():
        predicted = model.classify(feats).argmax(1).cpu()
    pred_c, pred_p = predicted[:len(keep_c)], predicted[len(keep_c):]
    label = torch.cat([clean_y[keep_c.to(clean_y.device)].cpu() if clean_y is not None else pred_c,
                       poisoned_y[keep_p.to(poisoned_y.device)].cpu() if poisoned_y is not None else pred_p])
    points = len(x)
    tsne = TSNE(n_components=2, init="pca", random_state=seed, perplexity=min(perplexity, (points - 1) / 3))
    coords = tsne.fit_transform(feats.cpu().double().numpy())
    return pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1],
                         "group": ["clean"] * len(keep_c) + ["poisoned"] * len(keep_p),
                         "predicted": predicted.numpy(), "label": label.numpy()})


def grad_cam(model: nn.Module, x: torch.Tensor, target: int | torch.Tensor | None = None, layer: str | None = None,
             batch_size: int = 256) -> torch.Tensor:
    """Grad-CAM heat maps ``float[N, H, W]`` in [0, 1] at the input resolution.

    For each image: the gradient of the ``target`` logit (the predicted class when None;
    an int, or one class per image) with respect to ``layer``'s output, averaged over
    positions, weighs that output's channels; the weighted sum, through a ReLU, is
    upsampled bilinearly to the image size and divided by its maximum (a map with nothing
    positive stays zero). ``layer`` (a module with ``[N, C, h, w]`` output) defaults to
    :func:`grad_cam_layer`: ``layer4.0``, the first block of the last stage, for
    PreAct-ResNet18 (see there why not the last block's output)."""
    _check_images(x)
    _check_batch_size(batch_size)
    layer = layer if layer is not None else grad_cam_layer(model)
    module = _module(model, layer)
    classes = _num_classes(model)
    if target is not None:
        t = torch.as_tensor(target)
        if t.dim() > 1 or (t.dim() == 1 and len(t) != len(x)):
            raise ValueError(f"target must be None, a class or one class per image ({len(x)}), "
                             f"got shape {tuple(t.shape)}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= classes):
            raise ValueError(f"target classes must be in 0..{classes - 1}, got {t.tolist()}")
    device = _device(model)
    captured: dict[str, torch.Tensor] = {}
    handle = module.register_forward_hook(lambda _m, _args, out: captured.__setitem__("a", out))
    maps = []
    try:
        with _eval(model), torch.enable_grad():
            for start, xb in zip(range(0, len(x), batch_size), _batches(x, batch_size, device)):
                xb = xb.clone().requires_grad_(True)  # so the layer's output has a graph even for frozen weights
                logits = model(xb)
                if target is None:
                    tb = logits.argmax(1)
                else:
                    tb = torch.as_tensor(target, device=device).expand(len(x))[start:start + len(xb)]
                score = logits.gather(1, tb.view(-1, 1)).sum()
                activation = captured["a"]
                if activation.dim() != 4:
                    raise ValueError(f"Grad-CAM needs a layer with [N, C, h, w] output; {layer!r} gives "
                                     f"{tuple(activation.shape)}")
                (grad,) = torch.autograd.grad(score, activation)
                weights = grad.mean(dim=(2, 3), keepdim=True)
                cam = F.relu((weights * activation).sum(1, keepdim=True)).detach()
                cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
                peak = cam.flatten(1).max(1).values.clamp_min(1e-12).view(-1, 1, 1)
                maps.append((cam / peak).clamp_(0, 1))
    finally:
        handle.remove()
    return torch.cat(maps) if maps else torch.empty(0, *x.shape[-2:], device=device)


@torch.no_grad()
def _channel_means(model: nn.Module, module: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean of ``module``'s output per channel over images (and positions) of ``x``."""
    device = _device(model)
    captured: dict[str, torch.Tensor] = {}
    handle = module.register_forward_hook(lambda _m, _args, out: captured.__setitem__("a", out))
    total, count = None, 0
    try:
        with _eval(model):
            for xb in _batches(x, batch_size, device):
                model(xb)
                a = captured["a"].float()
                s = a.sum(dim=[d for d in range(a.dim()) if d != 1])
                total = s if total is None else total + s
                count += a.numel() // a.shape[1]
    finally:
        handle.remove()
    return total / count


def neuron_activation(model: nn.Module, clean_x: torch.Tensor, poisoned_x: torch.Tensor, layer: str | None = None,
                      batch_size: int = 512) -> pd.DataFrame:
    """Mean activation of every channel of ``layer`` (default :func:`default_layer`: the
    last block's output) over clean and over poisoned images (and positions).

    One row per channel: ``channel``, ``clean``, ``backdoor``, ``difference`` (backdoor
    minus clean) and ``rank`` (0 = largest difference), sorted by ``difference``, largest first."""
    _check_images(clean_x, "clean_x")
    _check_images(poisoned_x, "poisoned_x")
    _check_batch_size(batch_size)
    if len(clean_x) == 0 or len(poisoned_x) == 0:
        raise ValueError("neuron_activation needs at least one clean and one poisoned image")
    layer = layer if layer is not None else default_layer(model)
    module = _module(model, layer)
    clean = _channel_means(model, module, clean_x, batch_size).cpu()
    backdoor = _channel_means(model, module, poisoned_x, batch_size).cpu()
    frame = pd.DataFrame({"channel": range(len(clean)), "clean": clean.numpy(), "backdoor": backdoor.numpy(),
                          "difference": (backdoor - clean).numpy()})
    frame = frame.sort_values("difference", ascending=False, kind="stable").reset_index(drop=True)
    frame["rank"] = range(len(frame))
    return frame


def filter_normalized_direction(model: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random direction in weight space, one tensor per parameter (Li et al., 2018): Gaussian
    noise with each filter (output slice of a conv / row of a linear layer) rescaled to the
    norm of the same filter of the weights; BN parameters and biases (1-D) get zero."""
    direction = {}
    for name, p in model.named_parameters():
        if p.dim() <= 1:
            direction[name] = torch.zeros_like(p)
            continue
        d = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(device=p.device, dtype=p.dtype)
        d_norm = d.flatten(1).norm(dim=1).clamp_min(1e-12)
        w_norm = p.detach().flatten(1).norm(dim=1)
        direction[name] = d * (w_norm / d_norm).view(-1, *[1] * (p.dim() - 1))
    return direction


@torch.no_grad()
def _loss_and_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    device = _device(model)
    loss = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    for start, xb in zip(range(0, len(x), batch_size), _batches(x, batch_size, device)):
        yb = y[start:start + batch_size].to(device)
        logits = model(xb)
        loss += F.cross_entropy(logits.float(), yb, reduction="sum").double()
        correct += (logits.argmax(1) == yb).sum()
    values = torch.stack([loss, correct.double()]).tolist()  # one host sync per grid point
    return values[0] / len(x), values[1] / len(x)


def loss_landscape(model: nn.Module, x: torch.Tensor, y: torch.Tensor, directions: int = 1, steps: int = 21,
                   span: float = 1.0, seed: int = 0, batch_size: int = 512) -> pd.DataFrame:
    """Loss (mean cross-entropy) and accuracy on ``(x, y)`` at ``w + a * d1 (+ b * d2)`` for
    a grid of ``steps`` values of ``a`` (and ``b``) in ``[-span, span]``, with ``d1``, ``d2``
    random filter-normalised directions drawn from ``seed`` (:func:`filter_normalized_direction`).

    ``steps`` must be odd so the grid holds the trained weights (``a = b = 0``) exactly.
    Batch-norm statistics stay those of the model (eval mode). The weights are restored
    bit for bit afterwards. Returns one row per grid point: ``alpha`` (and ``beta``),
    ``loss``, ``accuracy``."""
    _check_images(x)
    _check_batch_size(batch_size)
    if directions not in (1, 2):
        raise ValueError(f"directions must be 1 or 2, got {directions!r}")
    if not isinstance(steps, int) or steps < 3 or steps % 2 == 0:
        raise ValueError(f"steps must be an odd integer >= 3 (so the grid holds the model itself), got {steps!r}")
    if not (isinstance(span, (int, float)) and math.isfinite(span) and span > 0):
        raise ValueError(f"span must be a finite number > 0, got {span!r}")
    if tuple(y.shape) != (len(x),) or len(x) == 0:
        raise ValueError(f"y must hold one label per image ({len(x)} >= 1), got shape {tuple(y.shape)}")
    half = steps // 2
    offsets = torch.arange(-half, half + 1, dtype=torch.float64) * (span / half)  # 0 exactly in the middle
    generator = torch.Generator().manual_seed(seed)
    dirs = [filter_normalized_direction(model, generator) for _ in range(directions)]
    params = dict(model.named_parameters())
    saved = {name: p.detach().clone() for name, p in params.items()}
    grid = [(a,) for a in offsets.tolist()] if directions == 1 else \
        [(a, b) for a in offsets.tolist() for b in offsets.tolist()]
    rows = []
    try:
        with _eval(model), torch.no_grad():
            for point in grid:
                for name, p in params.items():
                    moved = saved[name]
                    for coef, d in zip(point, dirs):
                        if coef != 0:
                            moved = moved + coef * d[name]
                    p.copy_(moved)
                loss, acc = _loss_and_accuracy(model, x, y, batch_size)
                rows.append((*point, loss, acc))
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
    columns = ["alpha", "beta"][:directions] + ["loss", "accuracy"]
    return pd.DataFrame(rows, columns=columns)


@torch.no_grad()
def confusion_matrix(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                     batch_size: int = 1024, transform: Callable[[torch.Tensor], torch.Tensor] | None = None
                     ) -> torch.Tensor:
    """``int64[num_classes, num_classes]`` counts: row = true class (``y``), column = the
    model's prediction for ``x`` (uint8 or [0, 1] floats), after ``transform`` per batch
    if given (e.g. ``attack.apply`` with the true labels shows where the trigger sends
    each class). One bincount over all (true, predicted) pairs."""
    _check_images(x)
    _check_batch_size(batch_size)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if tuple(y.shape) != (len(x),):
        raise ValueError(f"y must have shape ({len(x)},), got {tuple(y.shape)}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must be in 0..{num_classes - 1}, got {int(y.min())}..{int(y.max())}")
    device = _device(model)
    with _eval(model):
        parts = [model(transform(xb) if transform is not None else xb).argmax(1)
                 for xb in _batches(x, batch_size, device)]
    predicted = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64, device=device)
    if len(predicted) and int(predicted.max()) >= num_classes:
        raise ValueError(f"the model predicts class {int(predicted.max())}, outside 0..{num_classes - 1}")
    index = y.to(device).long() * num_classes + predicted
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


__all__ = ["features", "tsne_embedding", "grad_cam", "neuron_activation", "loss_landscape", "confusion_matrix",
           "filter_normalized_direction", "default_layer", "grad_cam_layer"]
