"""Training, evaluation, defenses and the zoo on shared `smoke` models (mnist5k, seed 0)."""
import json

import pytest
import torch

from backdoorlab import attacks, metrics, paths, pipeline, train, zoo
from backdoorlab.pipeline import train_attack
from conftest import CALIBRATED_THREADS, smoke_params

# learning bars, and retraining that must reproduce the shared models exactly: 2 threads (conftest.py)
pytestmark = pytest.mark.calibrated

# Per-attack learning bars at `smoke` scale: PreAct-ResNet18 width 8, 4 epochs on 2,000 mnist5k digits,
# pratio 0.1, seed 0, on CPU; each set with margin below what was measured (closing note of issue 3).
# Dirty-label attacks must reach ASR >= 0.8; clean-label attacks get lower, stated bars.
ASR_BAR = {
    "badnets": 0.9, "blended": 0.9,  # measured 0.998, 1.0
    "sig": 0.8,  # clean-label; measured 0.925
    "ftrojan": 0.8,  # with its smoke_params (magnitude 255); measured 1.0
    "ctrl": 0.3,  # clean-label, with its smoke_params (magnitude 255); measured 0.55
    "refool": 0.9,  # measured 0.989
    "lf": 0.9, "trojannn": 0.9, "ssba": 0.9,  # measured 1.0, 0.993, 1.0
    "poison_ink": 0.8, "adaptive_blend": 0.8,  # measured 0.916, 0.967
    "blind": 0.9,  # measured 1.0
    "wanet": 0.9, "bpp": 0.9, "lira": 0.9,  # with their smoke_params; measured 0.998, 1.0, 1.0
    "inputaware": 0.8,  # with its smoke_params (cross_ratio 0.25); measured 0.94-0.99
    "lc": 0.5,  # clean-label, with its smoke_params (5x5 checkerboards); measured 0.82 (0.65 with 1 thread)
    "adaptive_patch": 0.9,  # with its smoke_params (no cover samples); measured 0.996
}
# Triggers that change MNIST digits so much that even a clean model answers the target class.
TRIGGER_FOOLS_CLEAN_MODEL = {"refool": "alpha_t 0.4 leaves 60% reflection: the clean model says 0 on ~0.7 of them"}
ACC_MARGIN = 0.05  # attacked model's clean accuracy may trail the clean model's by at most this
# LIRA trains every sample both clean and poisoned (alpha 0.5), BppAttack's negatives slow the clean task:
# measured gaps 0.042-0.052 at smoke.
# LC poisons every target-class training image at pratio 0.1, so clean "0"s without the checkerboards lose
# accuracy (measured gap 0.052, 0.096 with 1 thread; SIG shows the same at `default`). Adaptive-Patch without
# covers relabels 10% of the digits on faint (opacity 0.2-0.5) patches: measured gap 0.058.
ACC_MARGIN_FOR = {"lira": 0.08, "bpp": 0.08, "lc": 0.1, "adaptive_patch": 0.08}


def test_clean_training_learns(clean_result):
    assert clean_result.metrics["acc"] >= 0.85
    history = clean_result.record["history"]
    assert history["loss"][-1] < history["loss"][0] * 0.5 and len(history["acc"]) == 4


def test_every_attack_has_a_bar():
    assert set(ASR_BAR) == set(attacks.names())
    dirty = [n for n, bar in ASR_BAR.items() if not attacks.ATTACKS.get(n).clean_label]
    assert all(ASR_BAR[n] >= 0.8 for n in dirty)


@pytest.mark.parametrize("name", attacks.names())
def test_attack_implants_a_working_backdoor(name, attack_results, clean_result):
    result = attack_results[name]
    assert result.metrics["acc"] >= clean_result.metrics["acc"] - ACC_MARGIN_FOR.get(name, ACC_MARGIN)
    assert result.metrics["asr"] >= ASR_BAR[name]
    if name not in TRIGGER_FOOLS_CLEAN_MODEL:  # the trigger alone does not fool a clean model: it was learnt
        assert metrics.evaluate(clean_result.model, result.data, result.attack)["asr"] < 0.3


def test_the_shared_smoke_models_and_calibrated_tests_use_the_calibrated_thread_count(attack_results, clean_result):
    assert torch.get_num_threads() == CALIBRATED_THREADS  # every test in this module is `calibrated`
    for result in [clean_result, *attack_results.values()]:  # their zoo records say how they were trained
        assert result.record["environment"]["cpu_threads"] == CALIBRATED_THREADS, result.setting.attack


def test_poison_record_matches_indices(attack_results):
    result = attack_results["badnets"]
    assert result.record["poison"]["count"] == len(result.poison_indices) == int(0.1 * len(result.data.train_y))
    assert result.record["poison"]["index_hash"] == attacks.index_hash(result.poison_indices)


def test_zoo_reuses_a_trained_model_without_training(attack_results, smoke_setting, smoke_data, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the zoo entry should have been loaded, not retrained")

    monkeypatch.setattr(pipeline, "fit", no_training)
    again = train_attack(smoke_setting, smoke_data, progress=False)
    before = attack_results["badnets"]
    for (k, a), b in zip(before.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert again.metrics == before.metrics


def test_zoo_entry_is_safetensors_plus_json(attack_results):
    folders = [p for p in paths.zoo_dir().iterdir() if p.name.startswith("badnets-mnist5k")]
    assert folders
    folder = folders[0]
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "record.json"]
    header_len = int.from_bytes((folder / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((folder / "model.safetensors").read_bytes()[8:8 + header_len])
    assert "conv1.weight" in header and "linear.weight" in header
    record = json.loads((folder / "record.json").read_text())
    assert {"setting", "metrics", "poison", "environment", "history"} <= set(record)
    assert record["environment"]["torch"] == torch.__version__ and record["setting"]["attack"] == "badnets"


def test_an_incomplete_zoo_entry_is_retrained(tmp_path, monkeypatch):
    monkeypatch.setenv("BACKDOORLAB_RUNS", str(tmp_path))
    model = torch.nn.Linear(2, 2)
    zoo.save("m", {"a": 1}, model, {"metrics": {}})
    assert zoo.exists("m", {"a": 1})
    (zoo.entry_dir("m", {"a": 1}) / "record.json").unlink()  # as if killed before the record was written
    assert not zoo.exists("m", {"a": 1})
    assert not zoo.exists("m", {"a": 2})


def test_a_zoo_entry_records_the_environment_that_trained_it(tmp_path, monkeypatch):
    monkeypatch.setenv("BACKDOORLAB_RUNS", str(tmp_path))
    record = zoo.save("m", {"a": 1}, torch.nn.Linear(2, 2), {"metrics": {}})
    assert record == json.loads((zoo.entry_dir("m", {"a": 1}) / "record.json").read_text())
    assert record["setting"] == {"a": 1} and record["metrics"] == {}
    assert record["environment"]["cpu_threads"] == torch.get_num_threads()
    assert record["environment"]["device"] == "cpu" and record["environment"]["torch"] == torch.__version__


def test_same_seed_same_metrics_on_cpu(smoke_setting, smoke_data, attack_results, tmp_path, monkeypatch):
    monkeypatch.setenv("BACKDOORLAB_RUNS", str(tmp_path))  # empty zoo: retrain from scratch
    retrained = train_attack(smoke_setting, smoke_data, progress=False)
    assert retrained.metrics == attack_results["badnets"].metrics


def test_predict_matches_model_argmax(attack_results):
    result = attack_results["badnets"]
    x = result.data.test_x[:50]
    expected = result.model(x.float() / 255).argmax(1)
    assert torch.equal(train.predict(result.model, x, batch_size=7), expected)


def test_fit_needs_attack_and_indices_together(smoke_data):
    from backdoorlab import models

    m = models.for_bundle("preactresnet18", smoke_data, width=2)
    with pytest.raises(ValueError, match="both attack and poison_indices"):
        train.fit(m, smoke_data, train.Recipe(epochs=1), attacks.create("badnets"), None)


def test_recipe_optimizer_choice():
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert isinstance(train.Recipe(epochs=1).make_optimizer(params), torch.optim.SGD)
    adam = train.Recipe(epochs=1, lr=1e-3, weight_decay=0.0, optimizer="adam").make_optimizer(params)
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["lr"] == 1e-3
    assert "optimizer" not in train.Recipe(epochs=1).key()  # zoo keys from before the choice stay valid
    assert train.Recipe(epochs=1, optimizer="adam").key()["optimizer"] == "adam"
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'; valid choices: sgd, adam"):
        train.Recipe(epochs=1, optimizer="lbfgs")


def test_warmup_cosine_schedule_steps_per_optimiser_step():
    assert [train.warmup_cosine(s, 4, 12) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert train.warmup_cosine(4, 4, 12) == 1.0 and train.warmup_cosine(8, 4, 12) == pytest.approx(0.5)
    assert train.warmup_cosine(12, 4, 12) == pytest.approx(0.0)
    recipe = train.Recipe(epochs=3, lr=0.1, optimizer="adamw", schedule="warmup-cosine", warmup_steps=4)
    optimizer = recipe.make_optimizer([torch.nn.Parameter(torch.zeros(3))])
    scheduler = recipe.make_scheduler(optimizer, epoch_steps=4)
    lrs = []
    for _ in range(12):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.1 * train.warmup_cosine(s, 4, 12) for s in range(12)])
    assert recipe.key()["warmup_steps"] == 4 and recipe.key()["schedule"] == "warmup-cosine"
    with pytest.raises(ValueError, match="warmup_steps must be >= 0 and needs schedule='warmup-cosine'"):
        train.Recipe(epochs=1, warmup_steps=2)
    with pytest.raises(ValueError, match="unknown schedule 'linear'; valid choices: cosine, constant, warmup-cosine"):
        train.Recipe(epochs=1, schedule="linear")


def test_clip_rule_exempts_biases_norms_and_logit_scale_from_weight_decay():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LayerNorm(16), torch.nn.Linear(16, 2))
    model.logit_scale = torch.nn.Parameter(torch.ones([]))
    recipe = train.Recipe(epochs=1, optimizer="adamw", weight_decay=0.1, decay_norms_and_biases=False)
    decayed, exempt = recipe.make_optimizer(model.named_parameters()).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decayed["params"]) == ["0.weight", "4.weight"]
    assert decayed["weight_decay"] == 0.1 and exempt["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in exempt["params"]) == ["0.bias", "1.bias", "1.weight", "3.bias", "3.weight",
                                                              "4.bias", "logit_scale"]
    assert train.exempt_from_decay("visual.bn1.weight", torch.zeros(2, 2))  # by name, as the official rule
    assert not train.exempt_from_decay("visual.attnpool.k_proj.weight", torch.zeros(2, 2))
    assert len(train.Recipe(epochs=1).make_optimizer(model.named_parameters()).param_groups) == 1  # the default
    assert "decay_norms_and_biases" not in train.Recipe(epochs=1).key() and not recipe.key()["decay_norms_and_biases"]
    with pytest.raises(ValueError, match="needs named parameters"):
        recipe.make_optimizer(model.parameters())


def test_mixing_setting_is_checked_and_keeps_old_keys():
    plain = pipeline.Setting(attack="badnets")
    assert "mixing" not in plain.key() and plain.id.endswith("-default")
    mixed = pipeline.Setting(attack="badnets", mixing="fmix").validate()
    assert mixed.key()["mixing"] == "fmix" and mixed.id.endswith("-default-fmix")
    with pytest.raises(ValueError, match="unknown mixing 'fmx'; valid choices: none, mixup, cutmix, fmix"):
        pipeline.Setting(attack="badnets", mixing="fmx").validate()
    with pytest.raises(ValueError, match="controls the victim's training"):
        pipeline.Setting(attack="wanet", mixing="mixup").validate()


def test_fit_with_adam_lowers_the_loss(smoke_data):
    from backdoorlab import models

    torch.manual_seed(0)
    m = models.for_bundle("preactresnet18", smoke_data, width=4)
    history = train.fit(m, smoke_data, train.Recipe(epochs=2, lr=1e-3, optimizer="adam", augment=False), progress=False)
    assert history.loss[1] < history.loss[0]


@pytest.mark.parametrize("name", attacks.names())
def test_trigger_survives_the_zoo_round_trip(name, attack_results, smoke_setting, smoke_data, monkeypatch):
    """A model loaded from the zoo comes with the same trigger (e.g. its trained generator), without retraining."""
    def no_training(*args, **kwargs):
        raise AssertionError("the zoo entry should have been loaded, not retrained")

    monkeypatch.setattr(pipeline, "fit", no_training)
    first = attack_results[name]
    again = train_attack(smoke_setting.with_attack(name, **smoke_params(name)), smoke_data,
                         progress=False)
    x = smoke_data.test_x[:8].float() / 255
    assert torch.equal(first.attack.apply(x), again.attack.apply(x))
    assert again.metrics == first.metrics
