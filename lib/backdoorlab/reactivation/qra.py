"""The query-based reactivation attack (QRA): a generator of small sample-specific
perturbations that make the *purified* model behave like its *retuned* version (the
backdoor back), while a *clean* model is left alone (so the perturbation re-activates the
dormant backdoor instead of being a plain adversarial example).

Paper: Min, Qin, Zhang, Shen, Cheng, "Uncovering, Explaining, and Mitigating the
Superficial Safety of Backdoor Defense", NeurIPS 2024 (Sec. 3, "query-based reactivation
attack"). Threat model: the attacker knows the trigger, holds poisoned and clean
samples, a retuned copy ``f_R`` of the purified model (the retuning attack,
:mod:`.retune`) and a clean model ``f_C`` of its own; at test time it adds ``delta(x)`` to
the triggered input of the deployed purified model ``f_P``.

As in the official code (``fine_tune/qra.py``; README ``--epochs 50 --alpha_qra 0.2
--clean_num_qra 500 --poison_num_qra 500``, ``--eps 16/255``):

- generator: an MLP autoencoder on the flattened image, ``D -> 1024 -> 1024 -> 1024 -> D``
  with ReLU and a tanh output; ``delta(x) = clamp(AE(x) * eps, -eps, eps)`` and
  ``x' = clamp(x + delta(x), 0, 1)`` (L-inf, sample-specific);
- data: 500 clean training images (labels ``y, y``) and 500 poisoned training images whose
  true class is not the target (the trigger applied; labels ``target, y_true``);
- loss: ``alpha * KL(softmax(f_R(x)) || softmax(f_P(x'))) + CE(f_C(x'), y_true)`` with
  ``alpha = 0.2``, the KL averaged over the batch ("batchmean", temperature 1);
- SGD lr 0.1, momentum 0.9, batch 128, 50 epochs (``epochs`` here), all three models
  frozen in eval mode;
- metrics: ASR of ``f_P`` on the poisoned test set with ``delta(x)`` added to the triggered
  image, and the "clean-sample ASR" (clean test images plus ``delta`` predicted as the
  target; the code uses the whole clean test set, target class included); the same two
  numbers on ``f_C`` (transfer).

Deviations and notes:

- Although the paper says "by merely querying purified models", the official code
  back-propagates through ``f_P`` and ``f_C`` (white-box gradients); this module does
  the same. A faithful black-box version would need a surrogate or zeroth-order gradients.
- Images live in [0, 1] here (the models normalise internally), so the generator
  normalises its input with the dataset's mean/std itself: it reads what the code's reads.
- The clean samples are ``clean_num`` random training images (the code: the first 500 of
  its 2 % clean split, i.e. random training images too); the poisoned ones are
  ``reactivation.poisoned_samples`` (the test-time trigger on random non-target training
  images) where the code reads BackdoorBench's saved poisoned training images.
- ``f_R(x)`` is computed once (all models are frozen), not per step.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import seeding
from ..data.bundle import to_float
from ..metrics import accuracy
from ..train import autocast, predict
from .common import poisoned_samples

if TYPE_CHECKING:  # pragma: no cover
    from ..pipeline import AttackResult


class QRAGenerator(nn.Module):
    """The MLP autoencoder ``D -> hidden -> hidden -> hidden -> D`` (ReLU, tanh output)
    over images of ``shape`` ``(C, H, W)``, reading them normalised with the dataset's
    ``mean``/``std`` (default: as they are); ``forward`` gives ``delta(x)`` for [0, 1]
    images with ``|delta|_inf <= eps``, ``perturb`` gives ``clamp(x + delta(x), 0, 1)``."""

    def __init__(self, shape: tuple[int, int, int], hidden: int = 1024, eps: float = 16 / 255,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> None:
        super().__init__()
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape must be (C, H, W) with positive sizes, got {tuple(shape)}")
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        if not 0 < eps <= 1:
            raise ValueError(f"eps must be in (0, 1], got {eps}")
        channels = shape[0]
        mean = (0.0,) * channels if mean is None else tuple(mean)
        std = (1.0,) * channels if std is None else tuple(std)
        if len(mean) != channels or len(std) != channels or min(std) <= 0:
            raise ValueError(f"mean and std need {channels} entries (std > 0), got {mean} and {std}")
        self.shape, self.eps = tuple(shape), float(eps)
        # the generator reads the normalised image, as the official code's does
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        dim = shape[0] * shape[1] * shape[2]
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(),  # encoder
            nn.Linear(hidden, hidden), nn.ReLU(),  # code
            nn.Linear(hidden, hidden), nn.ReLU(),  # decoder
            nn.Linear(hidden, dim), nn.Tanh(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``delta(x) = clamp(AE(x) * eps, -eps, eps)`` for a batch of [0, 1] images."""
        out = self.net(((x - self.mean) / self.std).flatten(1)).float() * self.eps
        return out.clamp(-self.eps, self.eps).view(len(x), *self.shape)

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        """``clamp(x + delta(x), 0, 1)``."""
        return (x + self(x)).clamp(0, 1)


def attacker_clean_indices(n: int, k: int, seed: int) -> torch.Tensor:
    """``k`` random training indices for the attacker's clean images, drawn independently of the
    samples the attack of the same seed poisoned (``seeding``)."""
    return torch.randperm(n, generator=seeding.stream(seed, "qra-clean"))[:k]


def _check(result: "AttackResult", models: dict[str, nn.Module], eps: float, alpha: float, clean_num: int,
           poison_num: int, epochs: int, lr: float, batch_size: int) -> None:
    if result.attack is None:
        raise ValueError("QRA needs an attacked setting (attack='none' has no trigger)")
    for name, model in models.items():
        if not isinstance(model, nn.Module):
            raise ValueError(f"{name} must be an nn.Module, got {type(model).__name__}")
    if not 0 < eps <= 1:
        raise ValueError(f"eps must be in (0, 1], got {eps}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    n_train = len(result.data.train_y)
    if not 1 <= clean_num <= n_train:
        raise ValueError(f"clean_num must be in [1, {n_train}] (the training set), got {clean_num}")
    for name, value in (("poison_num", poison_num), ("epochs", epochs), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")


def qra(purified: nn.Module, retuned: nn.Module, clean_model: nn.Module, result: "AttackResult", *,
        eps: float = 16 / 255, alpha: float = 0.2, clean_num: int = 500, poison_num: int = 500,
        epochs: int = 50, lr: float = 0.1, momentum: float = 0.9, batch_size: int = 128,
        hidden: int = 1024, seed: int = 0) -> tuple[QRAGenerator, dict[str, Any]]:
    """Train the QRA generator against ``purified`` (f_P), imitating ``retuned`` (f_R) while
    keeping ``clean_model`` (f_C) right; none of the three is modified.

    Returns the generator (eval mode) and a row: ``asr`` / ``clean_asr`` of f_P with the
    generator's perturbation (poisoned test set; clean test set), ``base_asr`` (f_P without
    it), ``clean_model_asr`` / ``clean_model_clean_asr`` (the same on f_C: transfer), the
    sample counts, and the final epoch's training loss."""
    _check(result, {"purified": purified, "retuned": retuned, "clean_model": clean_model},
           eps, alpha, clean_num, poison_num, epochs, lr, batch_size)
    bundle = result.data
    device = bundle.device

    # -- the attacker's data: clean (y, y) and poisoned (target, y_true) -----------------------
    pick = attacker_clean_indices(len(bundle.train_y), clean_num, seed).to(device)
    x_clean, y_clean = to_float(bundle.train_x[pick]), bundle.train_y[pick]
    x_bd, _, y_true = poisoned_samples(result, n=poison_num, split="train", seed=seed)
    x = torch.cat([x_clean, x_bd.to(device)])
    y_gt = torch.cat([y_clean, y_true.to(device)])

    frozen = (purified, retuned, clean_model)
    modes = [m.training for m in frozen]
    for m in frozen:
        m.eval()
    try:
        with torch.no_grad(), autocast(device):
            teacher = torch.cat([F.softmax(retuned(x[i:i + 1024]).float(), 1) for i in range(0, len(x), 1024)])

        torch.manual_seed(seed)
        gen = QRAGenerator(bundle.shape, hidden, eps, bundle.mean, bundle.std).to(device)
        params = list(gen.parameters())
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
        order_gen = torch.Generator().manual_seed(seed)
        n = len(x)
        loss_sum = torch.zeros((), device=device)
        for _ in range(epochs):
            order = torch.randperm(n, generator=order_gen).to(device)
            loss_sum = torch.zeros((), device=device)
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                xb = x[idx]
                with autocast(device):
                    x_adv = gen.perturb(xb)
                    log_p = F.log_softmax(purified(x_adv).float(), 1)
                    kl = F.kl_div(log_p, teacher[idx], reduction="batchmean")
                    ce = F.cross_entropy(clean_model(x_adv).float(), y_gt[idx])
                    loss = alpha * kl + ce
                # gradients for the generator only: the frozen models' .grad stay untouched
                grads = torch.autograd.grad(loss, params)
                for p, grad in zip(params, grads):
                    p.grad = grad
                opt.step()
                loss_sum += loss.detach() * len(idx)
        gen.eval()
        row = evaluate_qra(gen, purified, clean_model, result)
    finally:
        for m, mode in zip(frozen, modes):
            m.train(mode)
    row.update(clean_num=len(x_clean), poison_num=len(x_bd), epochs=epochs, eps=eps, alpha=alpha,
               train_loss=float(loss_sum) / n)
    return gen, row


def evaluate_qra(gen: QRAGenerator, purified: nn.Module, clean_model: nn.Module, result: "AttackResult",
                 batch_size: int = 1024) -> dict[str, float]:
    """The QRA metrics of a generator (see :func:`qra`)."""
    attack, bundle = result.attack, result.data
    if attack is None:
        raise ValueError("QRA needs an attacked setting (attack='none' has no trigger)")
    keep = attack.test_mask(bundle.test_y)
    x_bd, y_bd = bundle.test_x[keep], attack.target_labels(bundle.test_y[keep], bundle.num_classes)
    y_clean_target = attack.target_labels(bundle.test_y, bundle.num_classes)

    def triggered(xb: torch.Tensor) -> torch.Tensor:
        return gen.perturb(attack.apply(xb))

    out = {"base_asr": accuracy(predict(purified, x_bd, batch_size, transform=attack.apply), y_bd)}
    for prefix, model in (("", purified), ("clean_model_", clean_model)):
        out[f"{prefix}asr"] = accuracy(predict(model, x_bd, batch_size, transform=triggered), y_bd)
        out[f"{prefix}clean_asr"] = accuracy(predict(model, bundle.test_x, batch_size, transform=gen.perturb),
                                             y_clean_target)
    return out


__all__ = ["QRAGenerator", "qra", "evaluate_qra"]
