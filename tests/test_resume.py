"""No lost work: per-epoch checkpoints resume bit-identically, and workers sharing a zoo
build an entry once."""
import threading
import time

import pytest
import torch

from backdoorlab import attacks, pipeline, train, zoo
from backdoorlab.pipeline import Setting
from tiny import tiny_bundle, tiny_model


class Crash(RuntimeError):
    pass


def _badnets_run(checkpoint=None, crash_at=None, recipe=None):
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
    history = train.fit(model, bundle, recipe, attack, poison, seed=3, progress=False, checkpoint=checkpoint)
    return model, history


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_interrupted_training_resumes_bit_identically(tmp_path, optimizer):
    recipe = train.Recipe(epochs=4, batch_size=8, lr=0.05, optimizer=optimizer)
    straight, straight_history = _badnets_run(recipe=recipe)
    with pytest.raises(Crash):
        _badnets_run(tmp_path / "ckpt", crash_at=2, recipe=recipe)  # epochs 0 and 1 saved, 2 lost
    assert (tmp_path / "ckpt" / "checkpoint.json").exists()
    assert len(list((tmp_path / "ckpt").glob("state-*.safetensors"))) == 1
    resumed, history = _badnets_run(tmp_path / "ckpt", recipe=recipe)
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
