"""No lost work: per-epoch checkpoints resume bit-identically, and workers sharing a zoo
build an entry once."""
import contextlib
import dataclasses
import threading
import time

import pytest
import torch

from backdoorlab import attacks, defenses, mixing, pipeline, train, zoo
from backdoorlab.losses import cross_entropy
from backdoorlab.models import clone
from backdoorlab.pipeline import Setting
from tiny import tiny_bundle, tiny_model


class Crash(RuntimeError):
    pass


def _badnets_run(checkpoint=None, crash_at=None, recipe=None, mixing_method=None):
    bundle = tiny_bundle(48)
    attack = attacks.create("badnets", target=0, patch_size=2)
    poison = attack.poison_indices(bundle.train_y, 0.25, seed=0)
    if crash_at is not None:
        def end_epoch(epoch):
            if epoch == crash_at:
                raise Crash(f"killed in epoch {epoch}")
        attack.end_epoch = end_epoch
    model = tiny_model(seed=1)
    recipe = recipe or train.Recipe(epochs=4, batch_size=8, lr=0.05)
    loss_fn = mixing.loss_fn(mixing_method, seed=5) if mixing_method else None  # fresh random streams per run
    history = train.fit(model, bundle, recipe, attack, poison, seed=3, progress=False, checkpoint=checkpoint,
                        loss_fn=loss_fn)
    return model, history


CLIP_RECIPE = dict(optimizer="adamw", weight_decay=0.1, schedule="warmup-cosine", warmup_steps=5,
                   decay_norms_and_biases=False)  # two parameter groups and a per-step schedule


@pytest.mark.parametrize("options, mixing_method", [({}, None), ({"optimizer": "adam"}, None), ({}, "fmix"),
                                                   ({}, "cutmix"), (CLIP_RECIPE, None)])
def test_interrupted_training_resumes_bit_identically(tmp_path, options, mixing_method):
    """Also with a mixing loss, whose random streams are part of the checkpoint, and with
    CLIP's recipe, whose per-step learning rate is part of it."""
    recipe = train.Recipe(epochs=4, batch_size=8, lr=0.05, **options)
    straight, straight_history = _badnets_run(recipe=recipe, mixing_method=mixing_method)
    with pytest.raises(Crash):
        _badnets_run(tmp_path / "ckpt", crash_at=2, recipe=recipe, mixing_method=mixing_method)  # epochs 0, 1 saved
    assert (tmp_path / "ckpt" / "checkpoint.json").exists()
    assert len(list((tmp_path / "ckpt").glob("state-*.safetensors"))) == 1
    resumed, history = _badnets_run(tmp_path / "ckpt", recipe=recipe, mixing_method=mixing_method)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert history.loss == straight_history.loss and len(history.loss) == 4


def test_checkpoint_of_another_recipe_is_refused(tmp_path):
    with pytest.raises(Crash):
        _badnets_run(tmp_path / "ckpt", crash_at=1)
    with pytest.raises(ValueError, match="recipe"):
        _badnets_run(tmp_path / "ckpt", recipe=train.Recipe(epochs=5, batch_size=8, lr=0.05))


def test_training_controlled_attack_refuses_checkpoint(tmp_path):
    bundle = tiny_bundle(16)
    attack = attacks.create("wanet", target=0)
    with pytest.raises(ValueError, match="controls training"):
        train.fit(tiny_model(), bundle, train.Recipe(epochs=1, batch_size=8), attack,
                  attack.poison_indices(bundle.train_y, 0.25, 0), progress=False, checkpoint=tmp_path / "c")


def test_zoo_lock_serialises_builders(tmp_path, monkeypatch):
    """Threads open the lock file separately, so flock excludes them as it does processes."""
    monkeypatch.setenv("BACKDOORLAB_RUNS", str(tmp_path))
    built, setting = [], {"what": "shared"}

    def worker():
        with zoo.lock("entry", setting):
            if not zoo.exists("entry", setting):
                time.sleep(0.2)
                built.append(1)
                zoo.save("entry", setting, torch.nn.Linear(1, 1), {})

    threads = [threading.Thread(target=worker) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert built == [1]


def test_concurrent_workers_train_an_attacked_model_once(tmp_path, monkeypatch):
    monkeypatch.setenv("BACKDOORLAB_RUNS", str(tmp_path))
    calls = []
    real_fit = pipeline.fit

    def counting_fit(*args, **kwargs):
        calls.append(1)
        time.sleep(0.3)  # long enough for the other worker to reach the zoo
        kwargs["seed"] = 0
        return real_fit(*args, **{**kwargs, "progress": False})

    monkeypatch.setattr(pipeline, "fit", counting_fit)
    setting = Setting(attack="badnets", scale="smoke", width=4)
    bundle = pipeline.load_data(setting).subset(torch.arange(64), 32)
    results = [None, None]

    def worker(i):
        results[i] = pipeline.train_attack(setting, bundle, progress=False)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(calls) == 1
    assert results[0].key == results[1].key
    for a, b in zip(results[0].model.state_dict().values(), results[1].model.state_dict().values()):
        assert torch.equal(a, b)


def _two_stage(folder=None, crash_at_step=None):
    """A defense-like run: fine-tune, change the weights with the global RNG, fine-tune again.
    Returns the model and how many training steps each stage ran."""
    torch.manual_seed(0)
    bundle, model, steps = tiny_bundle(48), tiny_model(seed=1), {"first": 0, "second": 0}

    def counting(stage):
        def loss_fn(m, x, y):
            steps[stage] += 1
            if stage == "second" and steps[stage] == crash_at_step:
                raise Crash(f"killed at step {crash_at_step} of the second stage")
            return cross_entropy(m, x, y)
        return loss_fn

    recipe = train.Recipe(epochs=3, batch_size=8, lr=0.05)  # 6 steps per epoch
    with train.checkpoints(folder) if folder is not None else contextlib.nullcontext():
        train.fit(model, bundle, recipe, seed=3, progress=False, loss_fn=counting("first"))
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + 0.1 * torch.randn_like(p))
        train.fit(model, bundle, recipe, seed=4, progress=False, loss_fn=counting("second"))
    return model, steps


def test_checkpoints_block_resumes_a_multi_stage_run(tmp_path):
    straight, steps = _two_stage()
    assert steps == {"first": 18, "second": 18}
    with pytest.raises(Crash):
        _two_stage(tmp_path / "ckpt", crash_at_step=15)  # second stage: epochs 0 and 1 saved, 2 lost
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["fit-0", "fit-1"]
    resumed, steps = _two_stage(tmp_path / "ckpt")
    assert steps == {"first": 0, "second": 6}  # the first stage is restored, the second redoes one epoch
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("scale, defense, checkpointed", [("paper", "ft", True), ("smoke", "ft", False),
                                                        ("paper", "nft", False)])  # NFT: not resumable
def test_paper_scale_defense_checkpoints_each_fit_and_cleans_up(tmp_path, monkeypatch, scale, defense, checkpointed):
    monkeypatch.setenv("BACKDOORLAB_RUNS", str(tmp_path))
    setting = Setting(attack="badnets", scale="smoke", width=4)
    bundle = pipeline.load_data(setting).subset(torch.arange(64), 32)
    result = pipeline.train_attack(setting, bundle, progress=False)
    result = dataclasses.replace(result, setting=dataclasses.replace(setting, scale=scale))
    saved, real_save = [], train.save_checkpoint

    def recording_save(folder, *args, **kwargs):
        saved.append(folder)
        real_save(folder, *args, **kwargs)

    monkeypatch.setattr(train, "save_checkpoint", recording_save)

    def two_epoch_ft(self, model, clean, **kwargs):
        tuned = clone(model)
        train.fit(tuned, clean, train.Recipe(epochs=2, batch_size=4), progress=False)
        return tuned

    monkeypatch.setattr(defenses.DEFENSES.get(defense), "purify", two_epoch_ft)
    pipeline.defend(result, defense, clean_ratio=0.25, progress=False)
    assert bool(saved) == checkpointed
    if checkpointed:
        assert [p.name for p in saved] == ["fit-0", "fit-0"] and saved[0].parent.name == "checkpoint"
        assert not saved[0].parent.exists()  # removed once the defended model is in the zoo
