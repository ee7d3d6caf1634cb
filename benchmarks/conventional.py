"""The conventional pipeline the benchmarks compare against: BackdoorBench's way of feeding
a model, written once and swapped in for backdoorlab's data path.

- ``PerSampleDataset``: one image at a time in ``__getitem__`` (uint8 HWC, as BackdoorBench
  keeps its poisoned PNGs), poisoned there if its index is in the poison set, turned into a
  PIL image and through torchvision CPU transforms (RandomCrop with padding, flip where the
  dataset uses it, ToTensor).
- ``conventional_fit``: ``train.fit``'s signature and recipe (optimiser, schedule, loss
  function), fed by a ``DataLoader`` with worker processes, fp32, ``loss.item()`` and an
  accuracy ``.item()`` every step.
- ``conventional_predict`` / ``conventional_batches``: evaluation and the defenses' own
  inner loops (ANP's masks, ...) through the same kind of ``DataLoader``.
- ``conventional_pipeline()``: a context in which every backdoorlab module that imported
  ``fit``, ``predict`` or ``tools.batches`` sees these instead, so a defense's own code runs
  unchanged on the conventional data path: the comparison is the same loop, fed two ways.

Normalisation stays inside the models (backdoorlab's models take [0, 1] pixels), so the
conventional path skips torchvision's ``Normalize``: a small saving in its favour.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import Counter
from typing import Any, Iterator

import torch
from PIL import Image
from torchvision import transforms

from backdoorlab import train
from backdoorlab.data.bundle import TensorBundle
from backdoorlab.defenses import tools
from backdoorlab.losses import cross_entropy

CALLS: Counter[str] = Counter()  # how often each conventional replacement ran (the benchmarks record it)
WORKERS: list[int | None] = [None]  # DataLoader workers inside conventional_pipeline(workers=...)


def default_workers() -> int:
    """BackdoorBench's default of 4 loader workers, or fewer on a smaller machine."""
    return min(4, os.cpu_count() or 1)


class PerSampleDataset(torch.utils.data.Dataset):
    """Images of ``x`` (uint8 NCHW) one at a time, poisoned by ``attack`` where ``poisoned``
    says so (label set to the target), then PIL + torchvision transforms."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, attack=None, poisoned: torch.Tensor | None = None,
                 crop_padding: int = 0, flip: bool = False, augment: bool = False):
        self.x = x.cpu().permute(0, 2, 3, 1).numpy()  # N, H, W, C uint8
        self.y = y.cpu().numpy()
        self.poison = set(torch.nonzero(poisoned.cpu()).flatten().tolist()) if poisoned is not None else set()
        self.attack = attack
        steps: list[Any] = []
        if augment:
            steps.append(transforms.RandomCrop(self.x.shape[1], padding=crop_padding))
            if flip:
                steps.append(transforms.RandomHorizontalFlip())
        steps.append(transforms.ToTensor())
        self.transform = transforms.Compose(steps)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        img, label = self.x[i], int(self.y[i])
        if i in self.poison:
            t = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
            img = (self.attack.apply(t)[0] * 255).round().byte().permute(1, 2, 0).numpy()
            label = self.attack.target
        return self.transform(Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)), label


def loader(dataset: torch.utils.data.Dataset, batch_size: int, *, shuffle: bool, seed: int = 0,
           workers: int | None = None) -> torch.utils.data.DataLoader:
    workers = default_workers() if workers is None else workers
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                                       generator=torch.Generator().manual_seed(seed))


def plain_optimizer(recipe: train.Recipe, params) -> torch.optim.Optimizer:
    """The recipe's optimiser with torch's default (unfused) kernels, as BackdoorBench builds it."""
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    cls = torch.optim.Adam if recipe.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=recipe.lr, weight_decay=recipe.weight_decay)


def conventional_fit(model, data: TensorBundle, recipe: train.Recipe, attack=None, poison_indices=None, *,
                     seed: int = 0, loss_fn=None, progress: bool = True, desc: str = "train", checkpoint=None,
                     workers: int | None = None) -> train.History:
    """``train.fit`` the conventional way (see the module docstring); ``workers`` defaults to
    ``conventional_pipeline``'s, else ``default_workers()``. Progress bars and checkpoints
    are not part of the conventional loop and are ignored."""
    CALLS["fit"] += 1
    if recipe.schedule == "warmup-cosine" or not recipe.decay_norms_and_biases:
        raise ValueError("the conventional loop models BackdoorBench's recipes, not CLIP's (warm-up, decay exemptions)")
    if attack is not None and attack.controls_training:
        raise ValueError(f"the conventional pipeline poisons a dataset; {attack.name} controls training")
    device = data.device
    poisoned = None
    if poison_indices is not None:
        poisoned = torch.zeros(len(data.train_y), dtype=torch.bool)
        poisoned[poison_indices.cpu()] = True
    dataset = PerSampleDataset(data.train_x, data.train_y, attack=attack, poisoned=poisoned,
                               crop_padding=data.crop_padding, flip=data.flip, augment=recipe.augment)
    batches = loader(dataset, recipe.batch_size, shuffle=True, seed=seed,
                     workers=WORKERS[0] if workers is None else workers)
    model = model.to(device)
    optimizer = plain_optimizer(recipe, model.parameters())
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs)
                 if recipe.schedule == "cosine" else None)
    loss_fn = loss_fn or cross_entropy
    history = train.History()
    start = time.perf_counter()
    model.train()
    for _ in range(recipe.epochs):
        total, correct, seen = 0.0, 0, 0
        for x, y in batches:
            if len(y) < 2:
                continue
            x, y = x.to(device), y.to(device)
            out = loss_fn(model, x, y)
            loss, logits = out[0], out[1]
            targets = out[2] if len(out) > 2 else y
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)  # a host sync per step, as BackdoorBench does
            correct += (logits.argmax(1) == targets).sum().item()
            seen += len(y)
            history.steps += 1
        if scheduler is not None:
            scheduler.step()
        history.loss.append(total / max(seen, 1))
        history.acc.append(correct / max(seen, 1))
    history.seconds = time.perf_counter() - start
    model.eval()
    return history


@torch.no_grad()
def conventional_predict(model, x: torch.Tensor, batch_size: int = 1024, transform=None) -> torch.Tensor:
    """``train.predict`` through a per-sample ``DataLoader`` of batch 128, one sync per batch."""
    CALLS["predict"] += 1
    device = x.device
    was_training = model.training
    model.eval()
    dataset = PerSampleDataset(x.to(torch.uint8) if x.dtype == torch.uint8 else (x * 255).round().byte(),
                               torch.zeros(len(x), dtype=torch.int64))
    out = []
    for xb, _ in loader(dataset, 128, shuffle=False, workers=WORKERS[0]):
        xb = xb.to(device)
        if transform is not None:
            xb = transform(xb)
        out.append(model(xb).argmax(1).cpu())
    model.train(was_training)
    return torch.cat(out).to(device) if out else torch.empty(0, dtype=torch.int64, device=device)


def conventional_batches(bundle: TensorBundle, batch_size: int, generator: torch.Generator
                         ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``tools.batches`` (one shuffled pass of the training split) through a ``DataLoader``."""
    CALLS["batches"] += 1
    seed = int(torch.randint(0, 2**31 - 1, (), generator=generator))
    dataset = PerSampleDataset(bundle.train_x, bundle.train_y)
    for x, y in loader(dataset, batch_size, shuffle=True, seed=seed, workers=WORKERS[0]):
        if len(y) >= 2:
            yield x.to(bundle.device), y.to(bundle.device)


@contextlib.contextmanager
def conventional_pipeline(workers: int | None = None):
    """Within the block, backdoorlab trains, evaluates and iterates batches the conventional way."""
    swaps = [(train.fit, conventional_fit), (train.predict, conventional_predict), (tools.batches, conventional_batches)]
    patched = []
    for name, module in list(sys.modules.items()):
        if not (name == "backdoorlab" or name.startswith("backdoorlab.")) or module is None:
            continue
        for attr in ("fit", "predict", "batches"):
            value = getattr(module, attr, None)
            for original, replacement in swaps:
                if value is original:
                    patched.append((module, attr, value))
                    setattr(module, attr, replacement)
    WORKERS[0] = workers
    try:
        yield
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)
        WORKERS[0] = None
