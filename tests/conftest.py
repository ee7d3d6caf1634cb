"""Shared fixtures. Trained `smoke` models are session-scoped and backed by the zoo
(``BACKDOORLAB_RUNS``, set by ``make test`` to a fresh folder shared with nbval)."""
from __future__ import annotations

import atexit
import contextlib
import os
import random
import shutil
import tempfile

import pytest

if "BACKDOORLAB_RUNS" not in os.environ:  # a bare `pytest`: a private zoo, removed at exit
    os.environ["BACKDOORLAB_RUNS"] = tempfile.mkdtemp(prefix="backdoorlab-test-runs-")
    atexit.register(shutil.rmtree, os.environ["BACKDOORLAB_RUNS"], ignore_errors=True)
os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from backdoorlab import data  # noqa: E402
from backdoorlab.pipeline import CLEAN, Setting, load_data, train_attack  # noqa: E402

# The learning margins were measured with torch on 2 threads, the CI machine's 2 cores. The thread count changes a
# smoke model's floating-point sums and, at smoke size, sometimes whether a backdoor takes or a defense removes it.
# So the shared smoke models below are trained, and tests marked `calibrated` (bars on what a defense or attack
# learns) run, with 2 threads on every machine, whatever the process's own count (more cores would otherwise give
# other models; the CPU's instruction set still can). The other tests hold at any count: `make test` runs them as
# one-thread xdist workers.
CALIBRATED_THREADS = 2


@contextlib.contextmanager
def calibrated_threads():
    """Torch on ``CALIBRATED_THREADS`` inside the block; the process's own count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(CALIBRATED_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _same_start_for_every_test(request):
    """Each test starts from the same global random state, so it passes or fails alone, in any order and on any
    xdist worker; a `calibrated` test also runs with the calibrated thread count."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    if request.node.get_closest_marker("calibrated"):
        with calibrated_threads():
            yield
    else:
        yield


@pytest.fixture(scope="session")
def smoke_setting() -> Setting:
    return Setting(dataset="mnist5k", attack="badnets", scale="smoke", seed=0)


@pytest.fixture(scope="session")
def mnist() -> data.TensorBundle:
    return data.load("mnist5k")


@pytest.fixture(scope="session")
def smoke_data(smoke_setting):
    return load_data(smoke_setting, "cpu")


@pytest.fixture(scope="session")
def clean_result(smoke_setting, smoke_data):
    with calibrated_threads():
        return train_attack(smoke_setting.with_attack(CLEAN), smoke_data, progress=False)


@pytest.fixture(scope="session")
def attack_results(smoke_setting, smoke_data):
    """One trained smoke model per registered attack (trained once per session)."""
    from backdoorlab import attacks

    # Attacks whose paper defaults 4 smoke epochs on MNIST cannot learn declare stronger
    # `smoke_params` (FTrojan/CTRL magnitude, WaNet s, BppAttack levels, LIRA eps, Input-aware cross ratio,
    # LC's checkerboard size, Adaptive-Patch without cover samples).
    with calibrated_threads():
        return {name: train_attack(smoke_setting.with_attack(name, **smoke_params(name)), smoke_data, progress=False)
                for name in attacks.names()}


def smoke_params(name: str) -> dict:
    """An attack's parameters in the learning tests, as every `smoke` run on mnist5k gets them: its
    grayscale variant (if it needs colour) and its stronger ``smoke_params``."""
    from backdoorlab import attacks

    return attacks.params_for(name, (1, 28, 28), "smoke")


@pytest.fixture
def rgb_bundle():
    """A factory of small random colour (3x32x32) bundles, for attacks checked beyond one-channel mnist5k."""

    def make(n: int = 96, seed: int = 0, classes: int = 4) -> data.TensorBundle:
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
        y = torch.arange(n) % classes
        return data.TensorBundle("rgb-synthetic", x, y, x[:16].clone(), y[:16].clone(), classes,
                                 (0.5,) * 3, (0.25,) * 3, flip=True)

    return make


@pytest.fixture(scope="session")
def badnets_result(smoke_setting, smoke_data):
    """The smoke BadNets model (the same zoo entry as ``attack_results['badnets']``)."""
    with calibrated_threads():
        return train_attack(smoke_setting, smoke_data, progress=False)


def _purified(result, defense: str):
    """``result``'s model after ``defense`` (zoo-cached, calibrated threads) and its metrics row."""
    from backdoorlab.pipeline import defend

    with calibrated_threads():
        return defend(result, defense, progress=False)


@pytest.fixture(scope="session")
def ftsam_purified(badnets_result):
    """The smoke BadNets model purified by FT-SAM: ASR 0.998 -> 0.417, a half-removed backdoor, which the
    smoke-budget re-activation attacks can measurably push back up."""
    return _purified(badnets_result, "ftsam")


@pytest.fixture(scope="session")
def nad_purified(badnets_result):
    """The smoke BadNets model purified by NAD: ASR 0.998 -> 0.024, the one defense that removes it on every smoke
    model measured (docs/architecture.md#testing)."""
    return _purified(badnets_result, "nad")
