"""The one training loop. Every attack, defense and notebook trains through ``fit``.

Data stay on the device as uint8; each step gathers a batch, converts it to [0, 1],
poisons the chosen samples in one tensor op, augments on the device (random crop
with padding, flip where the dataset uses it) and takes an optimiser step. On CUDA it uses
bf16 autocast and channels_last. Loss and accuracy are accumulated on the device and
read once per epoch, so there is no host sync per step.

With ``checkpoint=folder`` the state after every epoch (weights, optimiser, schedule, RNG
streams, history) is saved there atomically, and a later call with the same folder resumes
after the last saved epoch, giving bit-identical weights on the same device (used for
``paper``-scale attack training, see ``pipeline.train_attack``). ``with checkpoints(folder):``
does the same for every ``fit`` call inside, numbered in call order, so a defense of
several training stages resumes after a crash (``pipeline.defend`` at ``paper`` scale).

BackdoorBench's recipe is the default: SGD lr 0.01, momentum 0.9, weight decay 5e-4,
batch 128, cosine annealing over the epochs; ``Recipe(optimizer="adam")`` gives Adam
(i-BAU and SAU use it, as in BackdoorBench). CLIP's recipe (the OpenAI/CleanCLIP/BadCLIP training
code) is AdamW with ``schedule="warmup-cosine"`` (a linear warm-up of ``warmup_steps``, then a
cosine to 0, both per step) and ``decay_norms_and_biases=False`` (no weight decay on biases,
norm layers and the logit scale).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import runs
from .attacks.base import Attack
from .data.bundle import TensorBundle, augment, to_float
from .losses import cross_entropy

# (folder, [fit calls so far]) while a ``checkpoints`` block is open
_CHECKPOINTS: contextvars.ContextVar[tuple[Path, list[int]] | None] = contextvars.ContextVar("checkpoints",
                                                                                             default=None)
SCHEDULES = ("cosine", "constant", "warmup-cosine")
OPTIMIZERS = ("sgd", "adam", "adamw")
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass(frozen=True)
class Recipe:
    epochs: int
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # per epoch; "warmup-cosine" per step, after ``warmup_steps`` linear ones
    augment: bool = True
    optimizer: str = "sgd"  # "adam"/"adamw" ignore momentum (betas 0.9/0.999); i-BAU and SAU use Adam, CLIP AdamW
    warmup_steps: int = 0
    decay_norms_and_biases: bool = True  # False: CLIP's rule, see ``exempt_from_decay``

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; valid choices: {', '.join(SCHEDULES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; valid choices: {', '.join(OPTIMIZERS)}")
        if self.warmup_steps < 0 or (self.warmup_steps and self.schedule != "warmup-cosine"):
            raise ValueError(f"warmup_steps must be >= 0 and needs schedule='warmup-cosine', got {self.warmup_steps} "
                             f"with {self.schedule!r}")

    def key(self) -> dict[str, Any]:
        """The fields a zoo key records. ``optimizer``, ``warmup_steps`` and
        ``decay_norms_and_biases`` came after the first zoo entries; at their defaults they
        are left out, so those entries keep their keys."""
        fields = dataclasses.asdict(self)
        for name, default in (("optimizer", "sgd"), ("warmup_steps", 0), ("decay_norms_and_biases", True)):
            if fields[name] == default:
                del fields[name]
        return fields

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        """The recipe's optimiser over ``params``: tensors, or ``(name, tensor)`` pairs as
        ``named_parameters()`` gives them, which ``decay_norms_and_biases=False`` needs (fused
        kernels on CUDA)."""
        named = [p if isinstance(p, tuple) else (None, p) for p in params]
        tensors = [p for _, p in named]
        fused = {"fused": True} if tensors and tensors[0].is_cuda else {}
        groups: list[dict[str, Any]] | list[torch.Tensor] = tensors
        if not self.decay_norms_and_biases:
            if any(name is None for name, _ in named):
                raise ValueError("decay_norms_and_biases=False needs named parameters (model.named_parameters())")
            exempt = [exempt_from_decay(name, p) for name, p in named]
            groups = [{"params": [p for p, e in zip(tensors, exempt) if not e]},
                      {"params": [p for p, e in zip(tensors, exempt) if e], "weight_decay": 0.0}]
            groups = [g for g in groups if g["params"]]
        if self.optimizer in ("adam", "adamw"):
            cls = torch.optim.Adam if self.optimizer == "adam" else torch.optim.AdamW
            return cls(groups, lr=self.lr, weight_decay=self.weight_decay, **fused)
        return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay, **fused)

    def make_scheduler(self, optimizer: torch.optim.Optimizer, epoch_steps: int) -> Any:
        """The learning-rate schedule (``None`` for a constant rate); ``fit`` steps a
        ``"warmup-cosine"`` one after every optimiser step, a ``"cosine"`` one after every epoch."""
        if self.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.epochs)
        if self.schedule == "warmup-cosine":
            total = self.epochs * epoch_steps
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, self.warmup_steps,
                                                                                          total))
        return None


def exempt_from_decay(name: str, param: torch.Tensor) -> bool:
    """CLIP's rule for parameters without weight decay: biases, norm-layer scales, the logit
    scale and any other tensor of fewer than two dimensions."""
    return param.ndim < 2 or "bias" in name or "logit_scale" in name or any(
        part.startswith(("bn", "ln")) for part in name.split("."))


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """The learning-rate factor of optimiser step ``step`` (from 0) of ``total``: linear from
    ``1/warmup`` to 1 over the first ``warmup`` steps, then a cosine from 1 to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total - warmup) / max(1, total - warmup)))


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimiser steps ``fit`` takes per epoch over ``n`` samples (a last batch of one is dropped)."""
    return max(1, n // batch_size + (n % batch_size > 1))


@dataclass
class History:
    """Per-epoch training loss and accuracy (on the poisoned stream), and wall time."""

    loss: list[float] = field(default_factory=list)
    acc: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0


def resolve_device(device: Any = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full precision on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar (a widget in Jupyter, text elsewhere); ``BACKDOORLAB_PROGRESS=0`` turns every bar off."""
    from tqdm.auto import tqdm

    enabled = enabled and os.environ.get("BACKDOORLAB_PROGRESS", "1").lower() not in ("0", "false", "off", "no")
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def fit(
    model: nn.Module,
    data: TensorBundle,
    recipe: Recipe,
    attack: Attack | None = None,
    poison_indices: torch.Tensor | None = None,
    *,
    seed: int = 0,
    loss_fn: LossFn | None = None,
    progress: bool = True,
    desc: str = "train",
    checkpoint: str | os.PathLike | None = None,
) -> History:
    """Train ``model`` in place on ``data.train_x`` (poisoned by ``attack`` at
    ``poison_indices``, if given) with ``recipe``; returns the per-epoch history.

    ``loss_fn(model, x, y) -> (loss, logits)`` replaces cross-entropy where a defense
    needs another objective; it may return ``(loss, logits, targets)`` when the training
    accuracy is not ``logits`` against ``y`` (CLIP: image-to-caption retrieval in the batch).
    An attack steers training through its hooks (``begin_training``, ``training_batch``, ``training_loss``, ``end_epoch``): data
    poisoning uses the defaults; training-controlled attacks (WaNet, Input-aware, ...)
    override them instead of copying this loop.

    ``checkpoint``: a folder for per-epoch checkpoints; an existing one is resumed. Not
    for training-controlled attacks (their trigger generators have their own optimisers).
    A ``loss_fn`` with random state of its own (``mixing.MixingLoss``) has it saved and
    restored through its ``checkpoint_state`` / ``restore_checkpoint_state``.
    """
    device = data.device
    if (attack is None) != (poison_indices is None):
        raise ValueError("give both attack and poison_indices, or neither")
    model = prepare_model(model, device)
    n = len(data.train_y)
    poisoned = torch.zeros(n, dtype=torch.bool, device=device)
    if poison_indices is not None:
        poisoned[poison_indices.to(device)] = True

    optimizer = recipe.make_optimizer(model.named_parameters())
    epoch_steps = steps_per_epoch(n, recipe.batch_size)
    scheduler = recipe.make_scheduler(optimizer, epoch_steps)
    per_step = recipe.schedule == "warmup-cosine"
    gen = torch.Generator(device=device).manual_seed(seed)
    order_gen = torch.Generator().manual_seed(seed)
    history = History()
    if loss_fn is None:
        loss_fn = attack.training_loss if attack is not None else cross_entropy
    if checkpoint is None and _CHECKPOINTS.get() is not None:
        root, calls = _CHECKPOINTS.get()
        checkpoint = root / f"fit-{calls[0]}"
        calls[0] += 1
    if checkpoint is not None and attack is not None and attack.controls_training:
        raise ValueError(f"checkpoint/resume covers clean and data-poisoning training, not {attack.name}, "
                         "which controls training with its own optimiser state")
    if attack is not None:
        attack.begin_training(model, data, recipe)
    first_epoch = 0
    if checkpoint is not None:
        first_epoch = load_checkpoint(checkpoint, recipe, model, optimizer, scheduler, gen, order_gen, history,
                                      loss_fn)
    start = time.perf_counter() - history.seconds
    model.train()
    with progress_bar(recipe.epochs * epoch_steps, desc, progress) as bar:
        bar.update(first_epoch * epoch_steps)
        for epoch in range(first_epoch, recipe.epochs):
            order = torch.randperm(n, generator=order_gen).to(device, non_blocking=True)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.int64)
            seen = 0  # a host-side count: no sync
            for step in range(epoch_steps):
                idx = order[step * recipe.batch_size:(step + 1) * recipe.batch_size]
                if len(idx) < 2:  # a batch of one breaks BatchNorm
                    continue
                x, y = to_float(data.train_x[idx]), data.train_y[idx]
                if attack is not None:
                    x, y = attack.training_batch(x, y, poisoned[idx], idx, data.num_classes)
                if recipe.augment:
                    x = augment(x, data.crop_padding, data.flip, gen)
                if device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(device):
                    out = loss_fn(model, x, y)
                loss, logits = out[0], out[1]
                targets = out[2] if len(out) > 2 else y
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if per_step:
                    scheduler.step()
                loss_sum += loss.detach() * len(idx)
                correct += (logits.detach().argmax(1) == targets).sum()
                seen += len(idx)
                bar.update(1)
            if scheduler is not None and not per_step:
                scheduler.step()
            if attack is not None:
                attack.end_epoch(epoch)
            stats = torch.stack([loss_sum, correct.float()]).tolist()  # one host sync per epoch
            history.loss.append(stats[0] / max(seen, 1))
            history.acc.append(stats[1] / max(seen, 1))
            history.steps += epoch_steps
            bar.set_postfix(epoch=epoch + 1, loss=f"{history.loss[-1]:.3f}", acc=f"{history.acc[-1]:.3f}")
            if checkpoint is not None:
                history.seconds = time.perf_counter() - start
                save_checkpoint(checkpoint, epoch + 1, recipe, model, optimizer, scheduler, gen, order_gen, history,
                                loss_fn)
    history.seconds = time.perf_counter() - start
    model.eval()
    return history


@contextlib.contextmanager
def checkpoints(folder: str | os.PathLike):
    """Per-epoch checkpoints for every ``fit`` call in the block that names none: the k-th
    call (from 0) uses ``folder/fit-k``. Run the same deterministic code again after a crash
    and each finished ``fit`` is restored from its last checkpoint without training, the
    interrupted one resumes after its last saved epoch, and the work between calls (pruning,
    a trigger search) is simply repeated. Work outside ``fit`` is not checkpointed."""
    token = _CHECKPOINTS.set((Path(folder), [0]))
    try:
        yield Path(folder)
    finally:
        _CHECKPOINTS.reset(token)


def save_checkpoint(folder: str | os.PathLike, epochs_done: int, recipe: Recipe, model: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, gen: torch.Generator,
                    order_gen: torch.Generator, history: History, loss_fn: Any = None) -> None:
    """Write the training state after ``epochs_done`` epochs: tensors as safetensors, the
    rest as JSON; ``checkpoint.json`` is written last and names the tensor file, so a
    crash mid-save leaves the previous checkpoint intact."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    state = optimizer.state_dict()
    optim_scalars: dict[str, dict[str, Any]] = {}
    for pid, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim/{pid}/{name}"] = value
            elif value is not None:
                optim_scalars.setdefault(str(pid), {})[name] = value
    tensors["rng/gen"], tensors["rng/order"] = gen.get_state(), order_gen.get_state()
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and gen.device.type == "cuda":
        tensors["rng/cuda"] = torch.cuda.get_rng_state(gen.device)
    name = f"state-{epochs_done}.safetensors"
    with runs.atomic_path(folder / name) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    runs.write_json(folder / "checkpoint.json", {
        "epochs_done": epochs_done, "tensors": name, "recipe": recipe.key(),
        "param_groups": state["param_groups"], "optim_scalars": optim_scalars,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "loss_state": loss_fn.checkpoint_state() if hasattr(loss_fn, "checkpoint_state") else None,
        "history": dataclasses.asdict(history)})
    for old in folder.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def load_checkpoint(folder: str | os.PathLike, recipe: Recipe, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, gen: torch.Generator, order_gen: torch.Generator, history: History,
                    loss_fn: Any = None) -> int:
    """Restore a ``save_checkpoint`` folder in place; returns the epochs already done (0 if none)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "checkpoint.json").exists():
        return 0
    meta = runs.read_json(folder / "checkpoint.json")
    if meta["recipe"] != json.loads(json.dumps(recipe.key())):
        raise ValueError(f"checkpoint {folder} was written for recipe {meta['recipe']}, not {recipe.key()}; "
                         "remove the folder to start over")
    tensors = load_file(str(folder / meta["tensors"]))
    model.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
    state: dict[Any, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, pid, name = key.split("/", 2)
            state.setdefault(int(pid), {})[name] = value  # load_state_dict moves it to the parameter's device
    for pid, scalars in meta["optim_scalars"].items():
        state.setdefault(int(pid), {}).update(scalars)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if scheduler is not None:
        scheduler.load_state_dict(meta["scheduler"])
    gen.set_state(tensors["rng/gen"])
    order_gen.set_state(tensors["rng/order"])
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng/cuda"], gen.device)
    if meta.get("loss_state") is not None and hasattr(loss_fn, "restore_checkpoint_state"):
        loss_fn.restore_checkpoint_state(meta["loss_state"])
    for name, value in meta["history"].items():
        setattr(history, name, value)
    return int(meta["epochs_done"])


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024,
            transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Predicted labels for images ``x`` (uint8 or [0, 1] floats), in large batches on
    ``x``'s device; ``transform`` (e.g. an attack's ``apply``) runs per batch first."""
    device = x.device
    model = prepare_model(model, device)
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(x), batch_size):
        xb = to_float(x[start:start + batch_size])
        if transform is not None:
            xb = transform(xb)
        if device.type == "cuda":
            xb = xb.contiguous(memory_format=torch.channels_last)
        with autocast(device):
            out.append(model(xb).argmax(1))
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64, device=device)
