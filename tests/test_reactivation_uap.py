"""Universal re-activation attacks (Zhu, Liang, Wu, NeurIPS 2024): white-box (WBA), Square
Attack (BBA) and transfer (TRA). Mechanisms on tiny models; learning on the smoke BadNets
model purified by FT-SAM (ASR 0.998 -> 0.417).

The learning bars are the fraction of the remaining gap ``(after - before) / (1 - before)``
that an attack closes. Measured under `make test` (reactivation at one thread): WBA 0.417 ->
0.486 (gap 0.12; a random +-eps delta: 0.437); Square Attack, 200 queries on 128 samples,
0.417 -> 0.463 (gap 0.08); TRA from FP + SAU to FT-SAM, 0.417 -> 0.463 (gap 0.08).
With these smoke budgets (eps 0.05, 20 steps) none of the three wakes the NAD-purified model
(ASR 0.024 -> 0.033 / 0.027 / 0.024), so they are tested on the half-purified one; the
retuning attack does wake it (tests/test_reactivation_retune.py).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from backdoorlab import models
from backdoorlab.pipeline import defend
from backdoorlab.reactivation.common import asr_under, budget_of, poisoned_samples
from backdoorlab.reactivation.square import SquareLog, p_schedule, square_reactivation, window_side
from backdoorlab.reactivation.whitebox import reactivation_loss, transfer_reactivation, whitebox_reactivation
from tiny import tiny_model

BOUND = {"linf": 1e-6, "l2": 1e-5}


class Counting(nn.Module):
    """Counts forward calls and fails if one could build a graph (a black box gives no gradients)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled()
        self.calls += 1
        return self.model(x)


def tiny_data(n: int = 24, channels: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, 12, 12, generator=g), torch.zeros(n, dtype=torch.long)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert model.training  # the caller's mode is restored


def within(delta: torch.Tensor, norm: str, eps: float) -> bool:
    return budget_of(delta, norm) <= eps + BOUND[norm]


# --- mechanisms ---------------------------------------------------------------------------


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.5)])
def test_whitebox_budget_shape_and_frozen_model(norm, eps):
    model = tiny_model().train()
    before = snapshot(model)
    x, t = tiny_data()
    delta = whitebox_reactivation(model, x, t, norm=norm, eps=eps, outer_steps=2, inner_steps=2, lr=100.0,
                                  batch_size=8)
    assert delta.shape == (1, 1, 12, 12) and delta.device == x.device and not delta.requires_grad
    assert within(delta, norm, eps)
    assert budget_of(delta, norm) > 0.9 * eps  # the large steps reach the boundary: the projection is active
    assert_untouched(model, before)


@pytest.mark.parametrize("mode", ["avg", "step", "mom"])
@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.5)])
def test_transfer_budget_and_frozen_surrogates(mode, norm, eps):
    surrogates = [tiny_model(0).train(), tiny_model(1).train()]
    before = [snapshot(s) for s in surrogates]
    x, t = tiny_data()
    delta = transfer_reactivation(surrogates, x, t, mode=mode, norm=norm, eps=eps, steps=2, lr=100.0, batch_size=8)
    assert delta.shape == (1, 1, 12, 12) and within(delta, norm, eps)
    assert budget_of(delta, norm) > 0.9 * eps
    for s, b in zip(surrogates, before):
        assert_untouched(s, b)


def test_gradient_attacks_are_deterministic_per_seed():
    model = tiny_model()
    x, t = tiny_data()
    kw = dict(outer_steps=1, inner_steps=2, batch_size=8)
    a, b = (whitebox_reactivation(model, x, t, seed=0, **kw) for _ in range(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, whitebox_reactivation(model, x, t, seed=1, **kw))
    tr = [transfer_reactivation([model], x, 0, mode="mom", steps=2, batch_size=8, seed=3) for _ in range(2)]
    assert torch.equal(tr[0], tr[1])


def test_whitebox_loss_uses_the_runner_up_class():
    logits = torch.tensor([[5.0, 1.0, 3.0], [0.0, 4.0, 2.0]])
    t = torch.tensor([0, 0])
    p = logits.softmax(1)
    ce = nn.functional.cross_entropy(logits, t)
    runner_up = torch.stack([p[0, 2], p[1, 1]])  # best class other than the target
    expected = ce + 0.5 * (-torch.log(1.0001 - runner_up + 1e-12)).mean()
    assert torch.allclose(reactivation_loss(logits, t, 1.0, 0.5), expected)


@pytest.mark.parametrize("channels", [1, 3])
def test_square_budget_queries_and_black_box(channels):
    torch.manual_seed(0)
    model = models.create("preactresnet18", 4, channels, width=4).train()
    before = snapshot(model)
    counted = Counting(model)
    x, t = tiny_data(40, channels)
    delta, log = square_reactivation(counted, x, t, eps=0.05, max_queries=37, batch_size=32, early_stop_asr=None)
    assert isinstance(log, SquareLog)
    assert log.queries == counted.calls == 37 and not log.stopped_early
    assert delta.shape == (1, channels, 12, 12) and within(delta, "linf", 0.05)
    assert torch.allclose(delta.abs(), torch.full_like(delta, 0.05))  # every entry is +-eps at every query
    assert len(log.loss) == log.queries
    assert all(b <= a for a, b in zip(log.loss, log.loss[1:])) and 0 < log.accepted < log.queries
    assert_untouched(model, before)
    again, log2 = square_reactivation(model, x, t, eps=0.05, max_queries=37, batch_size=32, early_stop_asr=None)
    assert torch.equal(delta, again) and log2.loss == log.loss
    other, _ = square_reactivation(model, x, t, eps=0.05, max_queries=37, batch_size=32, seed=1, early_stop_asr=None)
    assert not torch.equal(delta, other)


def test_square_never_exceeds_the_query_budget_and_stops_early():
    counted = Counting(tiny_model())
    x, t = tiny_data()
    for budget in (1, 2, 11, 12):
        counted.calls = 0
        _, log = square_reactivation(counted, x, t, max_queries=budget, early_stop_asr=None)
        assert log.queries == counted.calls == budget
    counted.calls = 0
    _, log = square_reactivation(counted, x, t, max_queries=50, early_stop_asr=1e-9)  # met at once
    assert log.stopped_early and log.queries == counted.calls == 1


def test_square_schedule():
    assert [p_schedule(0.1, i, 10000) for i in (0, 10, 11, 51, 8001, 10000)] == \
        [0.1, 0.1, 0.05, 0.025, 0.1 / 512, 0.1 / 512]
    assert p_schedule(0.1, 2, 1000) == 0.05  # rescaled to the budget
    assert window_side(0.1, 28, 28) == 9 and window_side(1e-6, 28, 28) == 1 and window_side(1.0, 8, 8) == 7


def test_bad_inputs_raise_before_any_compute():
    model, (x, t) = tiny_model(), tiny_data()
    for kw in ({"norm": "l1"}, {"eps": 0.0}, {"eps": -0.1}, {"outer_steps": 0}, {"lr": 0.0}):
        with pytest.raises(ValueError):
            whitebox_reactivation(model, x, t, **kw)
    for kw in ({"mode": "sum"}, {"norm": "l1"}, {"eps": 0.0}, {"steps": 0}):
        with pytest.raises(ValueError, match="mode|norm|eps|steps"):
            transfer_reactivation([model], x, t, **kw)
    with pytest.raises(ValueError, match="avg, step, mom"):
        transfer_reactivation([model], x, t, mode="ensemble")
    with pytest.raises(ValueError):
        transfer_reactivation([], x, t)
    for kw in ({"norm": "l2"}, {"norm": "l1"}, {"eps": 0.0}, {"max_queries": 0}, {"max_queries": 1.5},
               {"p_init": 0.0}, {"early_stop_asr": 1.5}):
        with pytest.raises(ValueError):
            square_reactivation(model, x, t, **kw)
    with pytest.raises(ValueError, match="one label per sample"):
        whitebox_reactivation(model, x, t[:3])
    with pytest.raises(ValueError, match="floats"):
        square_reactivation(model, x.mul(255).to(torch.uint8), t)


# --- learning on the smoke BadNets model purified by FT-SAM--------------------------------


def gap_closed(before: float, after: float) -> float:
    return (after - before) / max(1.0 - before, 1e-6)


@pytest.fixture(scope="module")
def attacker(badnets_result):
    x, t, _ = poisoned_samples(badnets_result, n=256)
    return x, t


def test_whitebox_reactivates_ftsam(badnets_result, ftsam_purified, attacker):
    model, row = ftsam_purified
    before = row["asr"]
    assert asr_under(model, badnets_result) == pytest.approx(before)
    x, t = attacker
    # 20 steps instead of the paper's 50 x 5 x 7: lr 10 (paper 0.05) lets a step cross the budget.
    delta = whitebox_reactivation(model, x, t, eps=0.05, outer_steps=1, inner_steps=20, batch_size=256, lr=10.0)
    assert within(delta, "linf", 0.05)
    after = asr_under(model, badnets_result, delta)
    noise = torch.randint(0, 2, delta.shape, generator=torch.Generator().manual_seed(0)).float().mul(0.1).sub(0.05)
    control = asr_under(model, badnets_result, noise)  # a random +-eps delta of the same budget
    assert gap_closed(before, after) >= 0.06, (before, after)  # measured 0.12
    assert after > control, (after, control)


def test_square_reactivates_ftsam(badnets_result, ftsam_purified, attacker):
    model, row = ftsam_purified
    before = row["asr"]
    x, t = attacker
    counted = Counting(model)
    delta, log = square_reactivation(counted, x, t, eps=0.05, max_queries=200, batch_size=128, early_stop_asr=None)
    assert log.queries == counted.calls == 200
    assert within(delta, "linf", 0.05) and log.loss[-1] < log.loss[0]
    after = asr_under(model, badnets_result, delta)
    assert gap_closed(before, after) >= 0.04, (before, after, log.accepted)  # measured 0.08


def test_transfer_from_other_defenses_reactivates_ftsam(badnets_result, ftsam_purified, attacker):
    model, row = ftsam_purified
    before = row["asr"]
    surrogates = {name: defend(badnets_result, name, progress=False) for name in ("fp", "sau")}
    x, t = attacker
    delta = transfer_reactivation([m for m, _ in surrogates.values()], x, t, mode="avg", eps=0.05, steps=10,
                                  batch_size=256, lr=10.0)
    assert within(delta, "linf", 0.05)
    for name, (m, r) in surrogates.items():  # white-box on the surrogates themselves
        assert gap_closed(r["asr"], asr_under(m, badnets_result, delta)) >= 0.04, name  # measured 0.40, 0.08
    after = asr_under(model, badnets_result, delta)  # the victim was never queried
    assert gap_closed(before, after) >= 0.04, (before, after)  # measured 0.08


def test_paper_budget_is_the_official_codes_and_scales_shrink_it():
    from backdoorlab.reactivation import common, square, whitebox

    paper = common.budget("paper")
    assert (paper.poison_num, paper.wb_outer_steps, paper.wb_inner_steps, paper.transfer_steps) == (
        whitebox.PAPER_POISON_NUMS, whitebox.PAPER_OUTER_STEPS, whitebox.PAPER_INNER_STEPS,
        whitebox.PAPER_TRANSFER_STEPS)
    assert paper.square_queries == square.PAPER_MAX_QUERIES
    smoke, default = common.budget("smoke"), common.budget("default")
    for field in ("wb_outer_steps", "square_queries", "transfer_steps", "qra_epochs"):
        assert getattr(smoke, field) <= getattr(default, field) <= getattr(paper, field)
    with pytest.raises(ValueError, match="valid choices"):
        common.budget("huge")
