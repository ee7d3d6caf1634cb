"""The benchmark scripts run end to end at a small size and measure what they claim to:
both pipelines really ran, the conventional one through its own data path. No speed is
asserted here (speed belongs in ``benchmarks/``, measured as a ratio in one run)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from backdoorlab import models, train
from backdoorlab.defenses import ft, tools

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import concurrent_models  # noqa: E402
import conventional  # noqa: E402  (benchmarks/ is not a package)
import defense_throughput  # noqa: E402
import train_throughput  # noqa: E402


@pytest.fixture
def runs_root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("BACKDOORLAB_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("BACKDOORLAB_PROGRESS", "0")
    return tmp_path / "runs"


def run_script(module, argv: list[str], monkeypatch, runs_root: Path, name: str) -> dict:
    monkeypatch.setattr(sys, "argv", [name, *argv])
    module.main()
    return json.loads((runs_root / "benchmarks" / f"{name}.json").read_text())


def test_conventional_pipeline_swaps_the_data_path_and_restores_it():
    originals = (ft.fit, train.predict, tools.batches)
    with conventional.conventional_pipeline(workers=0):
        assert ft.fit is conventional.conventional_fit  # a defense's own `from ..train import fit`
        assert tools.predict is conventional.conventional_predict  # model selection (pruning rules)
        assert tools.batches is conventional.conventional_batches  # ANP's mask search
        assert conventional.WORKERS == [0]
    assert (ft.fit, train.predict, tools.batches) == originals and conventional.WORKERS == [None]


def test_conventional_fit_learns_and_keeps_fits_contract(mnist):
    bundle = mnist.subset(torch.arange(600))
    torch.manual_seed(0)
    model = models.for_bundle("preactresnet18", bundle, 4)
    history = conventional.conventional_fit(model, bundle, train.Recipe(epochs=3, batch_size=32, lr=0.05), workers=0)
    assert len(history.loss) == len(history.acc) == 3 and history.seconds > 0
    assert history.loss[-1] < 0.8 * history.loss[0]
    assert not model.training
    pred = conventional.conventional_predict(model, bundle.test_x[:300])
    agree = (pred == train.predict(model, bundle.test_x[:300])).float().mean()
    assert agree > 0.99  # same model, same answers (up to batch-size rounding)


def test_flop_count_matches_preact_resnet18():
    model = models.create("preactresnet18", 10, 3, 64)
    flops = train_throughput.training_flops_per_image(model, (3, 32, 32), torch.device("cpu"))
    assert 3.0e9 < flops < 3.6e9  # ~3.3 GFLOP per training image (forward 1.1, backward twice that)


def test_train_throughput_runs_both_pipelines(runs_root, monkeypatch):
    out = run_script(train_throughput, ["--data", "synthetic-cifar", "--n", "384", "--width", "4", "--epochs", "2",
                                        "--workers", "0"], monkeypatch, runs_root, "train_throughput")
    assert out["conventional_images_per_s"] > 0 and out["ours_images_per_s"] > 0
    assert out["ratio"] == pytest.approx(out["ours_images_per_s"] / out["conventional_images_per_s"])
    assert [len(out["loss"][k]) for k in ("conventional", "ours", "ours_seed1")] == [2, 2, 2]
    assert out["loss"]["ours"] != out["loss"]["ours_seed1"]  # the noise reference is another seed
    assert out["fraction_of_peak"] is None and out["training_flops_per_image"] > 0  # no peak known for a CPU


def test_defense_throughput_runs_each_defense_both_ways(runs_root, monkeypatch):
    out = run_script(defense_throughput, ["--defenses", "ft", "--width", "4", "--attack-epochs", "1",
                                          "--workers", "0"], monkeypatch, runs_root, "defense_throughput")
    (row,) = out["defenses"]
    assert row["defense"] == "ft" and row["ours_s"] > 0 and row["conventional_s"] > 0
    assert row["conventional_calls"]["fit"] == 1  # FT trained through the conventional loop
    assert {"acc", "asr", "ra"} <= set(row["ours"]) and {"acc", "asr", "ra"} <= set(row["conventional"])


def test_defense_throughput_rejects_unknown_defense(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["defense_throughput", "--defenses", "ft,nope"])
    with pytest.raises(SystemExit):
        defense_throughput.main()


def test_concurrent_models_runs_the_same_jobs_at_each_level(runs_root, monkeypatch):
    out = run_script(concurrent_models, ["--n", "256", "--width", "2", "--epochs", "1", "--batch-size", "64",
                                         "--models", "2", "--concurrency", "2", "--threads", "1"], monkeypatch,
                     runs_root, "concurrent_models")
    one, two = out["levels"]
    assert (one["workers"], two["workers"]) == (1, 2)  # one at a time is always the reference
    assert [job["seed"] for job in one["jobs"]] == [job["seed"] for job in two["jobs"]] == [0, 1]
    assert one["processes_used"] == 1 and two["processes_used"] == 2  # the jobs really ran side by side
    assert one["threads_per_worker"] == two["threads_per_worker"] == 1
    # concurrency changes the speed, not the jobs: at the same thread count each seed's model is the same
    assert two["max_abs_diff_vs_one_at_a_time"] == {"acc": 0.0, "asr": 0.0, "loss": 0.0}
    assert one["jobs"][0]["loss"] != one["jobs"][1]["loss"]  # and the seeds really differ


def test_concurrent_models_rejects_bad_levels(monkeypatch):
    for argv, message in ((["--concurrency", "0,2"], "worker counts"), (["--concurrency", "x"], "worker counts"),
                          (["--threads", "0"], "threads")):
        monkeypatch.setattr(sys, "argv", ["concurrent_models", *argv])
        with pytest.raises(SystemExit, match=message):
            concurrent_models.main()
