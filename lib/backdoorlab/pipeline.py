"""Attack -> defense -> metrics, with every trained model cached in the zoo.

>>> setting = Setting(dataset="mnist5k", attack="badnets", scale="default")
>>> result = train_attack(setting)                 # trained once, then loaded
>>> purified, row = defend(result, "ft")

``Setting.validate`` checks every name and number before any data is loaded or any
model trained; errors name the valid choices.
"""
from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from . import __version__, attacks, data, defenses, detectors, metrics, mixing, models, scales, train, zoo
from .attacks.base import Attack, check_pratio, index_hash
from .data.bundle import TensorBundle, to_float
from .train import Recipe, fit, resolve_device

CLEAN = "none"  # the attack name of a clean (unpoisoned) model


@dataclass(frozen=True)
class Setting:
    """One attacked model: what the zoo keys on."""

    dataset: str = "mnist5k"
    model: str = "preactresnet18"
    width: int | None = None  # None: the scale preset's width
    attack: str = "badnets"  # or "none" for a clean model
    attack_params: dict = field(default_factory=dict)
    pratio: float = 0.1
    target: int = 0
    seed: int = 0
    scale: str = "default"
    mixing: str = "none"  # training augmentation: none | mixup | cutmix | fmix (backdoorlab.mixing)

    @property
    def preset(self) -> scales.Scale:
        return scales.get(self.scale)

    @property
    def model_width(self) -> int:
        return self.width if self.width is not None else self.preset.width

    @property
    def id(self) -> str:
        """Readable run-folder name, e.g. ``mnist5k-preactresnet18-w16-p0.1-s0-default`` (with a
        ``-fmix`` style suffix when training mixes samples)."""
        mixed = "" if self.mixing == "none" else f"-{self.mixing}"
        return f"{self.dataset}-{self.model}-w{self.model_width}-p{self.pratio:g}-s{self.seed}-{self.scale}{mixed}"

    def key(self) -> dict[str, Any]:
        """The fields a zoo key records; ``mixing`` came after the first zoo entries and is
        left out at its default, so those entries keep their keys."""
        fields = {**dataclasses.asdict(self), "width": self.model_width}
        if fields["mixing"] == "none":
            del fields["mixing"]
        return fields

    def make_attack(self) -> Attack | None:
        if self.attack == CLEAN:
            return None
        return attacks.create(self.attack, target=self.target, **self.attack_params)

    def validate(self) -> "Setting":
        """Check every name and number (no data loaded, nothing trained)."""
        scales.get(self.scale)
        data.check(self.dataset)
        models.check(self.model, self.model_width)
        check_pratio(self.pratio)
        if self.mixing not in ("none", *mixing.METHODS):
            raise ValueError(f"unknown mixing {self.mixing!r}; valid choices: none, {', '.join(mixing.METHODS)}")
        if self.attack != CLEAN:
            attack = self.make_attack()
            attack.validate(data.num_classes(self.dataset), data.image_shape(self.dataset))
            if self.mixing != "none" and attack.controls_training:
                raise ValueError(f"{self.attack} controls the victim's training (its own loss), so mixing="
                                 f"{self.mixing!r} cannot be applied; use mixing='none' or a data-poisoning attack")
        return self

    def with_attack(self, attack: str, **params: Any) -> "Setting":
        return dataclasses.replace(self, attack=attack, attack_params=params)


@dataclass
class AttackResult:
    setting: Setting
    model: nn.Module
    attack: Attack | None
    poison_indices: torch.Tensor
    metrics: dict[str, float]
    record: dict[str, Any]
    data: TensorBundle
    key: str  # the zoo key of this attacked model


def load_data(setting: Setting, device: Any = None) -> TensorBundle:
    """The setting's dataset on ``device``, cut to the scale's train/test limits."""
    preset = setting.preset
    bundle = data.load(setting.dataset, resolve_device(device))
    train = torch.arange(min(len(bundle.train_y), preset.train_limit)) if preset.train_limit else None
    return bundle.subset(train, preset.test_limit)


def attack_recipe(setting: Setting) -> Recipe:
    preset = setting.preset
    return Recipe(epochs=preset.attack_epochs(setting.dataset), batch_size=preset.batch_size)


def train_attack(setting: Setting, bundle: TensorBundle | None = None, device: Any = None, progress: bool = True) -> AttackResult:
    """Train (or load from the zoo) the model of ``setting``, and evaluate it."""
    setting.validate()
    bundle = bundle if bundle is not None else load_data(setting, device)
    attack = setting.make_attack()
    poison = (attack.poison_indices(bundle.train_y, setting.pratio, setting.seed)  # checks pratio before any compute
              if attack is not None else torch.empty(0, dtype=torch.int64))
    if attack is not None:
        attack.prepare(bundle, scale=setting.scale, seed=setting.seed, progress=progress)
    recipe = attack_recipe(setting)
    key = {**setting.key(),
           "attack_params": attack.params() if attack else {}, "recipe": recipe.key(),
           "n_train": len(bundle.train_y), "n_test": len(bundle.test_y), "version": __version__}
    label = f"{setting.attack}-{setting.id}"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(setting.seed)
        model = models.for_bundle(setting.model, bundle, setting.model_width).to(bundle.device)
    with zoo.lock(label, key):  # concurrent workers train a shared setting once
        if zoo.exists(label, key):
            record = zoo.load(label, key, model)
            if attack is not None:
                attack.load_state_tensors(zoo.load_tensors(label, key, "attack", str(bundle.device)))
        else:
            record = _train_and_save(setting, bundle, recipe, attack, poison, model, label, key, progress)
    model.eval()
    return AttackResult(setting, model, attack, poison, record["metrics"], record, bundle, zoo.key(key))


def _train_and_save(setting: Setting, bundle: TensorBundle, recipe: Recipe, attack: Attack | None,
                    poison: torch.Tensor, model: nn.Module, label: str, key: dict[str, Any], progress: bool) -> dict[str, Any]:
    mixed = None if setting.mixing == "none" else mixing.loss_fn(setting.mixing, seed=setting.seed)
    resumable = setting.scale == "paper" and not (attack is not None and attack.controls_training)
    checkpoint = zoo.entry_dir(label, key) / "checkpoint" if resumable else None  # resumed after a crash
    history = fit(model, bundle, recipe, attack, poison if attack else None, seed=setting.seed, loss_fn=mixed,
                  progress=progress, desc=f"{setting.attack} {setting.id}", checkpoint=checkpoint)
    record = {
        "metrics": metrics.evaluate(model, bundle, attack),
        "poison": {"count": len(poison), "index_hash": index_hash(poison)},
        "history": dataclasses.asdict(history),
    }
    record = zoo.save(label, key, model, record, extra={"attack": attack.state_tensors() if attack else {}})
    if checkpoint is not None:
        shutil.rmtree(checkpoint, ignore_errors=True)
    return record


def poisoned_training_set(result: AttackResult, batch_size: int = 1024) -> tuple[TensorBundle, torch.Tensor]:
    """The training set exactly as the victim received it (poisoned images stored as uint8,
    poisoned labels), and the ground-truth mask of poisoned samples; for training-time
    defenses and dataset detectors. Training-controlled attacks have no fixed poisoned set."""
    attack, bundle = result.attack, result.data
    if attack is None:
        return bundle, torch.zeros(len(bundle.train_y), dtype=torch.bool, device=bundle.device)
    if attack.controls_training:
        raise ValueError(f"{attack.name} controls the victim's training, so there is no fixed poisoned training set "
                         "for a training-time defense or a dataset detector; use a data-poisoning attack")
    n = len(bundle.train_y)
    mask = torch.zeros(n, dtype=torch.bool, device=bundle.device)
    mask[result.poison_indices.to(bundle.device)] = True
    attack.begin_training(result.model, bundle, None)
    xs, ys = [], []
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(n, start + batch_size), device=bundle.device)
        x, y = attack.training_batch(to_float(bundle.train_x[idx]), bundle.train_y[idx], mask[idx], idx,
                                     bundle.num_classes)
        xs.append(x.mul(255).round_().clamp_(0, 255).to(torch.uint8))
        ys.append(y)
    poisoned = dataclasses.replace(bundle, train_x=torch.cat(xs), train_y=torch.cat(ys),
                                   meta={**bundle.meta, "poisoned_by": attack.name})
    return poisoned, mask


def uses_poisoned_set(defense: str | None = None, detector: str | None = None) -> bool:
    """Whether a defense or detector works on the poisoned training set (ABL, DBD, EP; AC,
    Spectral), which training-controlled attacks do not have."""
    if detector is not None:
        return detectors.DETECTORS.get(detector).kind == "dataset"
    cls = defenses.DEFENSES.get(defense)
    return cls.kind == "training" or cls.data_source == "poisoned_training_set"


def applicable(result: AttackResult, defense: str | None = None, detector: str | None = None) -> bool:
    """False where the method needs the poisoned training set and the attack controls training."""
    return not (result.attack is not None and result.attack.controls_training
                and uses_poisoned_set(defense, detector))


def defend(result: AttackResult, defense: str, clean_ratio: float = 0.05, progress: bool = True,
           clean_per_class: int | None = None, **params: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Apply ``defense`` to an attacked setting (cached in the zoo); returns the defended
    model and its metrics row (with DER/RIR against the undefended model).

    A purification defense gets the attacked model and the defender's clean subset (or, if
    its ``data_source`` says so, the poisoned training set); a training-time defense (ABL,
    DBD) trains a fresh model on the poisoned training set. Both of the latter are
    undefined for training-controlled attacks (a clear error). ``clean_per_class`` replaces
    the random ``clean_ratio`` subset by that many clean samples of every class. The row
    carries the defense's ``diagnostics`` (what it chose), if it reports any."""
    method = defenses.create(defense, **params)
    setting = result.setting
    clean_idx = data.clean_subset(result.data, clean_ratio, seed=setting.seed, per_class=clean_per_class)
    clean = result.data.subset(clean_idx)
    needs_poisoned_set = uses_poisoned_set(defense)
    if not applicable(result, defense):
        raise ValueError(f"{defense} needs the poisoned training set, and {setting.attack} controls the victim's "
                         "training, so there is none; use a data-poisoning attack")
    key = {"attacked_model": result.key,
           "defense": defense, "params": method.params(), "clean_ratio": clean_ratio,
           "clean_hash": index_hash(clean_idx), "data_source": "poisoned" if needs_poisoned_set else "clean",
           "version": __version__}
    label = f"{defense}-{setting.attack}-{setting.id}"
    defended = method.module_for(result.model)
    with zoo.lock(label, key):
        if zoo.exists(label, key):
            record = zoo.load(label, key, defended)
        else:
            record, defended = _defend_and_save(method, result, clean, clean_idx, needs_poisoned_set, label, key,
                                                progress)
    defended.eval()
    row = {"attack": setting.attack, "defense": defense, **record["metrics"], "seconds": record["seconds"],
           "clean_samples": record["clean"]["count"]}
    if record.get("diagnostics"):
        row["diagnostics"] = record["diagnostics"]
    if result.attack is not None:
        row["der"] = metrics.der(result.metrics, record["metrics"])
        row["rir"] = metrics.rir(result.metrics, record["metrics"])
    return defended, row


def _defend_and_save(method: defenses.Defense, result: AttackResult, clean: TensorBundle, clean_idx: torch.Tensor,
                     needs_poisoned_set: bool, label: str, key: dict[str, Any],
                     progress: bool) -> tuple[dict[str, Any], nn.Module]:
    """Run the defense and store it in the zoo. At ``paper`` scale every ``fit`` inside a
    resumable defense checkpoints each epoch, and a rerun after a crash resumes (see
    ``train.checkpoints``)."""
    setting = result.setting
    resumable = setting.scale == "paper" and method.resumable
    checkpoint = zoo.entry_dir(label, key) / "checkpoint" if resumable else None
    start = time.perf_counter()
    with train.checkpoints(checkpoint) if checkpoint is not None else contextlib.nullcontext():
        if method.kind == "training":
            poisoned, _ = poisoned_training_set(result)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(setting.seed)
                fresh = models.for_bundle(setting.model, result.data, setting.model_width).to(result.data.device)
            defended = method.train(fresh, poisoned, scale=setting.scale, seed=setting.seed, progress=progress)
        else:
            given = poisoned_training_set(result)[0] if needs_poisoned_set else clean
            defended = method.purify(result.model, given, scale=setting.scale, seed=setting.seed, progress=progress)
    seconds = time.perf_counter() - start
    record = {"metrics": metrics.evaluate(defended, result.data, result.attack), "seconds": seconds,
              "diagnostics": method.diagnostics(),
              "clean": {"count": len(clean_idx), "index_hash": index_hash(clean_idx)}}
    record = zoo.save(label, key, defended, record)
    if checkpoint is not None:
        shutil.rmtree(checkpoint, ignore_errors=True)
    return record, defended


def defense_rows(attacked: Mapping[str, AttackResult], names: Sequence[str], clean_ratio: float = 0.05,
                 params: Mapping[str, Mapping[str, Any]] | None = None, progress: bool = True
                 ) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Every defense in ``names`` against every attacked model (``{attack: result}``),
    with per-defense ``params``; returns the metric rows and the (attack, defense) pairs
    skipped because they are not defined (``applicable``)."""
    params = params or {}
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise ValueError(f"params name defenses that are not run: {unknown}; defenses: {list(names)}")
    for name in names:
        defenses.create(name, **params.get(name, {}))  # bad names and values fail before any compute
    rows, skipped = [], []
    for attack, result in attacked.items():
        for name in names:
            if not applicable(result, name):
                skipped.append((attack, name))
                continue
            rows.append(defend(result, name, clean_ratio=clean_ratio, progress=progress, **params.get(name, {}))[1])
    return rows, skipped


def detect(result: AttackResult, detector: str, clean_ratio: float = 0.05, **params: Any) -> dict[str, Any]:
    """Run a detector on an attacked setting and score it against the ground truth.

    Dataset detectors (AC, Spectral) scan the poisoned training set with the attacked
    model; input detectors (STRIP) score the clean test images and their triggered copies
    (non-target classes). Returns a row with TPR, FPR, AUC and wall seconds; the row is
    kept in the zoo, so a rerun reads it instead of scoring again."""
    method = detectors.create(detector, **params)
    setting, bundle = result.setting, result.data
    if result.attack is None:
        raise ValueError("detection needs an attacked setting (attack='none' has nothing to find)")
    clean_idx = data.clean_subset(bundle, clean_ratio, seed=setting.seed)
    key = {"attacked_model": result.key, "detector": detector, "params": method.params(),
           "clean_ratio": clean_ratio, "clean_hash": index_hash(clean_idx), "version": __version__}

    def run() -> dict[str, Any]:
        return {"row": _detect(result, method, bundle.subset(clean_idx))}

    return dict(zoo.cached_record(f"{detector}-{setting.attack}-{setting.id}", key, run)["row"])


def _detect(result: AttackResult, method: Any, clean: TensorBundle) -> dict[str, Any]:
    setting, bundle = result.setting, result.data
    start = time.perf_counter()
    if method.kind == "dataset":
        poisoned, truth = poisoned_training_set(result)
        x, y = poisoned.train_x, poisoned.train_y
    else:
        keep = result.attack.test_mask(bundle.test_y)
        benign = bundle.test_x[keep]
        triggered = torch.cat([result.attack.apply(to_float(benign[i:i + 1024])) for i in range(0, len(benign), 1024)])
        x = torch.cat([benign, triggered.mul(255).round_().clamp_(0, 255).to(torch.uint8)])
        y = torch.cat([bundle.test_y[keep], result.attack.target_labels(bundle.test_y[keep], bundle.num_classes)])
        truth = torch.cat([torch.zeros(len(benign), dtype=torch.bool), torch.ones(len(benign), dtype=torch.bool)])
    scores = method.score(result.model, x, y, clean, seed=setting.seed, scale=setting.scale)
    flagged = method.flag(scores, y)
    return {"attack": setting.attack, "detector": method.name, **metrics.detection(scores, flagged, truth),
            "seconds": time.perf_counter() - start}
