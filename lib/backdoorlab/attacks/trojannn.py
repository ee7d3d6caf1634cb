"""TrojanNN: a trigger optimised to excite chosen internal neurons, stamped in a mask.

Paper: Liu, Ma, Aafer, Lee, Zhai, Wang & Zhang, "Trojaning Attack on Neural Networks",
NDSS 2018. https://www.ndss-symposium.org/ndss-paper/trojaning-attack-on-neural-networks/

Threat model: dirty-label data poisoning with white-box access to a clean model (here
the package's clean surrogate). The attacker picks the neurons of one layer that are
most strongly connected to the next one, optimises the trigger pixels inside a fixed
mask so that those neurons fire at a target value, then poisons ``pratio`` of the
training set (trigger stamped, label set to the target); no control over training.

Hyperparameters (BackdoorBench's ``preactresnet18.yaml``): ``layer`` "linear" (the
neurons are its inputs, i.e. the penultimate features), ``num_neurons`` 2 (largest
summed |weight| to the next layer), ``target_value`` 100, 1000 mask iterations of
signed-gradient steps (``step_size`` 0.1) within ``eps`` 0.3 of the initial white mask,
on the trigger alone on a black canvas. Target 0, all-to-one, pratio 0.1.

Deviations: BackdoorBench's mask is an apple-logo image (``apple4.png``) we cannot ship;
the mask here is drawn procedurally: ``mask_shape`` "apple" (a disc with a notch on top
and a one-pixel stem) or "square", in a ``mask_size`` x ``mask_size`` box (at 32x32,
scaled with the resolution) in the bottom-right corner. The trigger replaces the pixels
inside the mask (the paper's stamping; BackdoorBench adds it to the image). Mask
iterations per scale: ``MASK_ITERS``. Trigger and mask are cached in the zoo.

>>> attack = TrojanNN(num_neurons=2, target_value=100.0)
>>> attack.prepare(bundle, scale="smoke")
>>> poisoned = attack.apply(images)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import __version__, scales, zoo
from . import register
from .base import Attack

# Trigger-optimisation iterations per scale ("paper": BackdoorBench's mask_update_iters).
MASK_ITERS = {"smoke": 100, "default": 300, "paper": 1000}
MASK_SHAPES = ("apple", "square")


@register("trojannn")
@dataclass
class TrojanNN(Attack):
    layer: str = "linear"  # module whose *input* neurons are driven
    num_neurons: int = 2
    target_value: float = 100.0
    step_size: float = 0.1
    eps: float = 0.3  # how far trigger pixels may move from the initial (white) mask
    mask_shape: str = "apple"
    mask_size: int = 10  # side of the mask's box at 32x32 resolution

    name = "trojannn"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.layer, str) or not self.layer:
            raise ValueError(f"layer must be a module name of the model (e.g. 'linear'), got {self.layer!r}")
        if isinstance(self.num_neurons, bool) or not isinstance(self.num_neurons, int) or self.num_neurons < 1:
            raise ValueError(f"num_neurons must be an integer >= 1, got {self.num_neurons!r}")
        if not 0 < self.step_size <= 1:
            raise ValueError(f"step_size must be in (0, 1], got {self.step_size}")
        if not 0 < self.eps <= 1:
            raise ValueError(f"eps must be in (0, 1], got {self.eps}")
        if self.mask_shape not in MASK_SHAPES:
            raise ValueError(f"unknown mask_shape {self.mask_shape!r}; valid choices: {', '.join(MASK_SHAPES)}")
        if isinstance(self.mask_size, bool) or not isinstance(self.mask_size, int) or not 3 <= self.mask_size <= 32:
            raise ValueError(f"mask_size must be an integer in 3..32 (pixels at 32x32), got {self.mask_size!r}")

    def validate(self, num_classes: int, shape: tuple[int, int, int] | None = None) -> None:
        super().validate(num_classes, shape)
        if shape is not None and self._side(shape[1]) > min(shape[1:]):
            raise ValueError(f"trojannn: a {self._side(shape[1])}-pixel mask does not fit a {shape[1]}x{shape[2]} "
                             "image; lower mask_size")

    def _side(self, height: int) -> int:
        return max(3, round(self.mask_size * height / 32))

    def mask(self, height: int, width: int) -> torch.Tensor:
        """``float[1, H, W]``, 1 inside the drawn shape (bottom-right corner)."""
        s = self._side(height)
        box = torch.ones(s, s)
        if self.mask_shape == "apple":
            r = torch.arange(s, dtype=torch.float32) + 0.5
            yy, xx = r[:, None], r[None, :]
            cy, cx, rad = 0.58 * s, 0.5 * s, 0.42 * s
            body = (yy - cy) ** 2 + (xx - cx) ** 2 <= rad ** 2
            notch = (yy - (cy - rad)) ** 2 + (xx - cx) ** 2 <= (0.18 * s) ** 2
            stem = (xx - cx).abs() < 0.5 + 0.04 * s
            stem = stem & (yy < cy - rad + 0.12 * s)
            box = ((body & ~notch) | stem).float()
        m = torch.zeros(1, height, width)
        m[:, height - s:, width - s:] = box
        return m

    def prepare(self, data: Any, *, scale: Any = None, seed: int = 0, progress: bool = False) -> None:
        """Pick the neurons in the clean surrogate and optimise the trigger (once; then from the zoo)."""
        self.validate(data.num_classes, data.shape)
        preset = scales.get(scale)
        iters = MASK_ITERS[preset.name]
        params = {k: v for k, v in self.params().items() if k not in ("target", "label_mode")}
        key = {"role": "trojannn-trigger", "dataset": data.name, "shape": list(data.shape),
               "n_train": len(data.train_y), "seed": seed, "scale": preset.name, "iters": iters, "params": params,
               "surrogate": {"model": "preactresnet18", "width": preset.width}, "version": __version__}
        label = f"trojannn-trigger-{data.name}-s{seed}-{preset.name}"

        def build() -> dict[str, torch.Tensor]:
            from .surrogate import clean_surrogate

            model = clean_surrogate(data, scale=preset, seed=seed, progress=progress)
            mask = self.mask(*data.shape[1:]).to(data.device)
            trigger, neurons, reached = self._optimise(model, mask.expand(data.shape[0], -1, -1).clone(), iters)
            return {"trigger": trigger, "mask": mask, "neurons": neurons, "activation": reached}

        tensors = zoo.cached_tensors(label, key, build, data.device)
        self._cache["trigger"], self._cache["mask"] = tensors["trigger"], tensors["mask"]
        self._cache["neurons"], self._cache["activation"] = tensors["neurons"], tensors["activation"]

    def _optimise(self, model: nn.Module, mask: torch.Tensor, iters: int) -> tuple[torch.Tensor, ...]:
        modules = dict(model.named_modules())
        module = modules.get(self.layer)
        weight = getattr(module, "weight", None)
        if module is None or weight is None or weight.dim() not in (2, 4):
            choices = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d))]
            raise ValueError(f"trojannn: layer {self.layer!r} is not a Linear/Conv2d of the surrogate; "
                             f"valid choices: {', '.join(choices)}")
        strength = weight.detach().abs().flatten(2).sum(-1) if weight.dim() == 4 else weight.detach().abs()
        if self.num_neurons > strength.shape[1]:
            raise ValueError(f"trojannn: num_neurons {self.num_neurons} exceeds the {strength.shape[1]} inputs of {self.layer!r}")
        neurons = strength.sum(0).argsort(descending=True)[:self.num_neurons]
        seen: dict[str, torch.Tensor] = {}
        hook = module.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0]))
        start = mask[None].clone()  # the white mask on a black canvas
        x = start.clone()
        try:
            for _ in range(iters):
                x.requires_grad_(True)
                model(x * mask)
                act = seen["x"][:, neurons]
                act = act.flatten(2).mean(-1) if act.dim() > 2 else act
                cost = ((act - self.target_value) ** 2).sum()
                (grad,) = torch.autograd.grad(cost, x)
                x = x.detach() - self.step_size * grad.sign()
                x = torch.min(torch.max(x, start - self.eps), start + self.eps).clamp_(0, 1)
            with torch.no_grad():
                model(x * mask)
                act = seen["x"][:, neurons]
                act = act.flatten(2).mean(-1) if act.dim() > 2 else act
        finally:
            hook.remove()
        return (x * mask)[0].detach(), neurons, act[0].detach()

    def parts(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if "trigger" not in self._cache:
            raise RuntimeError("trojannn: call prepare(data, scale=..., seed=...) first: it optimises the trigger "
                               "against a clean surrogate")
        return self.cached(("parts", device, dtype), lambda: (self._cache["trigger"].to(device, dtype)[None],
                                                              self._cache["mask"].to(device, dtype)[None]))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        trigger, mask = self.parts(x.device, x.dtype)
        if trigger.shape[1:] != x.shape[1:]:
            raise ValueError(f"trojannn: the trigger was prepared for images {tuple(trigger.shape[1:])}, "
                             f"got {tuple(x.shape[1:])}")
        return x * (1 - mask) + trigger * mask
