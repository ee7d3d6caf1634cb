"""Registry-wide defense and detector tests: every registered defense runs on the `smoke`
BadNets model and must lower its ASR below the bar stated here; every detector must score
the planted poisoned samples above chance. A new defense or detector without a bar fails
until its bar is stated."""
import pytest
import torch

from backdoorlab import defenses, detectors, metrics, models
from backdoorlab.defenses.base import Defense, TrainingDefense
from backdoorlab.pipeline import defend, defense_rows, detect, poisoned_training_set

pytestmark = pytest.mark.calibrated  # the bars below were measured with 2 threads (conftest.py)

# defense -> (ASR bar, ACC floor) on the smoke BadNets model (mnist5k, width 8, 4 epochs: ACC 0.938,
# ASR 0.998 under `make test`). Smoke defenses see 100 clean digits with a preset budget (FT: 3 epochs),
# so a bar is what a weak budget achieves, set above the value measured under `make test` (in the comment).
# Measured with the clean subset drawn independently of the poisoned samples (`backdoorlab.seeding`); before that
# fix it was the clean twins of 100 poisoned images, never seen clean in training, and FT, i-BAU and RNP looked far
# stronger (ASR 0.499, 0.004, 0.016).
# The bars hold on this one model, trained the same way on every machine (`calibrated`): on smoke models of other
# seeds, or trained at one thread, FT, ANP, i-BAU, SAU, RNP, FP, FST, FT-SAM, EP and PAM leave very different ASRs
# (measured in docs/architecture.md#testing).
# `None`: the defense does not remove this backdoor at smoke scale (see NOT_AT_SMOKE); the test then checks
# the documented behaviour: it runs, returns a copy, keeps clean accuracy and does not raise the ASR.
BARS: dict[str, tuple[float | None, float]] = {
    "ft": (None, 0.45),  # measured ASR 0.956, ACC 0.524
    "fp": (None, 0.75),  # 0.989, 0.794
    "nad": (0.3, 0.6),  # 0.024, 0.760
    "nc": (0.5, 0.6),  # 0.268, 0.726
    "anp": (0.85, 0.65),  # 0.769, 0.726 (300 mask iterations at smoke)
    "rnp": (None, 0.85),  # 0.962, 0.902
    "clp": (None, 0.85),  # 0.998, 0.938
    "ep": (None, 0.85),  # 0.905, 0.912 (on the poisoned training set)
    "bnp": (0.75, 0.8),  # 0.599, 0.852
    "ibau": (0.9, 0.85),  # 0.800, 0.916 (Adam lr 1e-4, 20 rounds)
    "sau": (0.35, 0.65),  # 0.186, 0.772 (Adam lr 1e-4: 9 steps at smoke)
    "fst": (0.6, 0.5),  # 0.494, 0.608
    "btidbf": (0.3, 0.75),  # 0.024, 0.836
    "mcr": (None, 0.85),  # 0.998, 0.932
    "abl": (0.5, 0.45),  # 0.118, 0.620 (isolation precision 1.0)
    "dbd": (0.45, 0.4),  # 0.171, 0.564
    "tsbd": (0.8, 0.5),  # 0.663, 0.636
    "nft": (None, 0.85),  # 0.993, 0.924
    "npd": (None, 0.85),  # 1.000, 0.886
    "ftsam": (0.6, 0.6),  # 0.417, 0.734
    "pam": (0.3, 0.7),  # 0.016, 0.778
}
# defenses whose returned module has new layers (and so new state-dict keys), reloaded through `module_for`
INSERTS_LAYERS: set[str] = {"npd"}
# Why a defense keeps the smoke backdoor. The clean subset is a random 5% of the *training* set (BackdoorBench's),
# so ~90% of its 100 digits are ones the model already fits and give little gradient.
NOT_AT_SMOKE = {
    "ft": "3 epochs on 100 clean training digits keep BadNets (ASR 0.956) and cost accuracy (0.938 -> 0.524; mostly "
          "the BatchNorm running statistics of ~10 batches of 32: re-estimated on 1,000 training digits, ACC 0.846)",
    "fp": "pruning the dormant last-layer channels does nothing here, and its 3 fine-tuning epochs keep BadNets (0.989)",
    "rnp": "the masks recovered after unlearning on 100 clean training digits keep the backdoor channels (ASR 0.962)",
    "ep": "on the width-8, 4-epoch model the low-entropy channels of 256 training images (~26 poisoned) are not the "
          "trigger's (ASR 0.905)",
    "clp": "with 8-64 channels per layer, mean + 3 std is almost never exceeded: no channel is pruned",
    "mcr": "the fine-tuned end point stays close to the backdoored one, so the short curve keeps the backdoor",
    "nft": "the gamma masks learnt on clean MixUp batches keep BadNets on mnist5k at every budget tried "
           "(default: ASR 0.946; the official 1000 x 128 budget: 0.97)",
    "npd": "the targeted L2 PGD (2 signed steps of 0.1, radius 1.52) never reproduces the saturated 3x3 corner patch "
           "(L2 norm 3.0), so the polarizer learns a robustness unrelated to the trigger (default BadNets ASR stays "
           "1.0; default WaNet 0.95 -> 0.53)",
}

# detector -> AUC floor on the smoke BadNets setting (measured in the comment)
AUC_FLOOR: dict[str, float] = {
    "spectral": 0.65,  # 0.776 (the target label is half poison at pratio 0.1, which caps TPR at 0.30)
    "ac": 0.75,  # 0.882
    "strip": 0.9,  # 1.000
}


@pytest.fixture(scope="module")
def badnets(attack_results):
    return attack_results["badnets"]


def test_every_defense_and_detector_states_its_bar():
    assert sorted(BARS) == defenses.names(), "state an ASR bar and ACC floor for every registered defense"
    assert set(NOT_AT_SMOKE) == {name for name, (bar, _) in BARS.items() if bar is None}
    assert sorted(AUC_FLOOR) == detectors.names(), "state an AUC floor for every registered detector"


@pytest.mark.parametrize("name", defenses.names())
def test_defense_lowers_asr_on_smoke_badnets(name, badnets):
    asr_bar, acc_floor = BARS[name]
    before = {k: v.clone() for k, v in badnets.model.state_dict().items()}
    defended, row = defend(badnets, name, progress=False)
    assert defended is not badnets.model
    assert all(torch.equal(before[k], v) for k, v in badnets.model.state_dict().items()), "the input model changed"
    structure = defenses.create(name).module_for(badnets.model)
    assert set(defended.state_dict()) == set(structure.state_dict()), "module_for states the defended structure"
    assert set(before) <= set(structure.state_dict()) or name in INSERTS_LAYERS, "say which defense changes the keys"
    if asr_bar is None:
        assert name in NOT_AT_SMOKE, f"{name}: say why it has no ASR bar"
        assert row["asr"] <= badnets.metrics["asr"] + 0.01, f"{name} raised the ASR"
    else:
        assert row["asr"] <= asr_bar, f"{name}: ASR {row['asr']:.3f} above its bar {asr_bar}"
    assert row["acc"] >= acc_floor, f"{name}: ACC {row['acc']:.3f} below its floor {acc_floor}"
    assert row["der"] == pytest.approx(metrics.der(badnets.metrics, row))
    # what the zoo stored is what the row says
    assert metrics.evaluate(defended, badnets.data, badnets.attack)["asr"] == pytest.approx(row["asr"], abs=1e-6)


@pytest.mark.parametrize("name", defenses.names())
def test_defense_kinds_and_params(name):
    defense = defenses.create(name)
    assert isinstance(defense, Defense) and defense.kind in ("purification", "training")
    assert isinstance(defense, TrainingDefense) == (defense.kind == "training")
    doc = __import__(type(defense).__module__, fromlist=["_"]).__doc__ or ""
    assert "Threat model" in doc, f"{name}: the module docstring states the threat model"


@pytest.mark.parametrize("name", detectors.names())
def test_detector_scores_planted_poison_above_chance(name, badnets):
    row = detect(badnets, name)
    assert row["auc"] >= AUC_FLOOR[name], f"{name}: AUC {row['auc']:.3f} below {AUC_FLOOR[name]}"
    assert 0 <= row["fpr"] <= 1 and 0 <= row["tpr"] <= 1


def test_poisoned_training_set_is_what_the_victim_trained_on(badnets):
    poisoned, truth = poisoned_training_set(badnets)
    data = badnets.data
    assert truth.sum() == len(badnets.poison_indices)
    assert torch.equal(poisoned.train_x[~truth], data.train_x[~truth])  # clean samples untouched
    assert torch.equal(poisoned.train_y[~truth], data.train_y[~truth])
    assert (poisoned.train_y[truth] == badnets.attack.target).all()
    x = data.train_x[truth][:16].float() / 255
    expected = badnets.attack.apply(x).mul(255).round().to(torch.uint8)
    assert torch.equal(poisoned.train_x[truth][:16], expected)
    assert torch.equal(poisoned.test_x, data.test_x)


def test_training_controlled_attacks_have_no_fixed_poisoned_set(attack_results):
    with pytest.raises(ValueError, match="controls the victim's training"):
        poisoned_training_set(attack_results["wanet"])


def test_auc_matches_the_rank_definition():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8])
    positive = torch.tensor([False, False, True, True])
    assert metrics.auc(scores, positive) == pytest.approx(0.75)
    assert metrics.auc(torch.ones(4), positive) == pytest.approx(0.5)  # ties count half
    row = metrics.detection(scores, scores > 0.3, positive)
    assert row == {"tpr": 1.0, "fpr": 0.5, "auc": pytest.approx(0.75)}


def test_pruning_tools_write_into_weights():
    from backdoorlab.defenses import tools

    model = models.create("preactresnet18", 10, 1, width=4)
    tools.zero_channels(model, "layer4.1.bn2", [0, 2])
    tools.zero_channels(model, "linear", [1])
    state = model.state_dict()
    assert (state["layer4.1.bn2.weight"][[0, 2]] == 0).all() and (state["layer4.1.bn2.bias"][[0, 2]] == 0).all()
    assert (state["layer4.1.bn2.weight"][1] != 0).all() and (state["linear.weight"][:, 1] == 0).all()
    with pytest.raises(TypeError, match="cannot prune"):
        tools.zero_channels(model, "layer4", [0])


def test_defense_rows_checks_first_and_skips_undefined_pairs(attack_results):
    attacked = {"badnets": attack_results["badnets"], "wanet": attack_results["wanet"]}
    with pytest.raises(ValueError, match="valid choices"):
        defense_rows(attacked, ["ft", "nope"])
    with pytest.raises(ValueError, match="not run"):
        defense_rows(attacked, ["ft"], params={"fp": {}})
    rows, skipped = defense_rows(attacked, ["ft", "ep"], progress=False)
    assert skipped == [("wanet", "ep")]  # EP needs the poisoned training set, which WaNet does not have
    assert [(r["attack"], r["defense"]) for r in rows] == [("badnets", "ft"), ("badnets", "ep"), ("wanet", "ft")]


def test_defend_with_one_clean_sample_per_class(badnets):
    _, row = defend(badnets, "ft", clean_per_class=1, progress=False)
    assert row["clean_samples"] == badnets.data.num_classes
    _, usual = defend(badnets, "ft", progress=False)
    assert usual["clean_samples"] == int(len(badnets.data.train_y) * 0.05)


def test_detection_is_kept_in_the_zoo(badnets, monkeypatch):
    first = detect(badnets, "spectral")
    from backdoorlab import pipeline

    def no_scoring(*args, **kwargs):
        raise AssertionError("the detection should have been read from the zoo")

    monkeypatch.setattr(pipeline, "_detect", no_scoring)
    assert detect(badnets, "spectral") == first
