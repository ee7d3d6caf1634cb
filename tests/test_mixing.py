"""MixUp, CutMix and FMix (backdoorlab.mixing): masks with the mixing fraction asked for, FMix's
low-frequency masks, seeded determinism, the mixed loss, a loss inside train.fit, and bad input."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backdoorlab import data, mixing, models, train

LAMBDAS = [0.0, 1e-3, 0.1, 0.25, 1 / 3, 0.5, 0.6180339, 0.75, 0.9, 0.999, 1.0]
SIZES = [(32, 32), (28, 28), (12, 17), (7, 5)]


def labelled_batch(n=8, c=2, size=(16, 16)):
    """Images whose every pixel holds the sample's index, labels = index: a mixed image tells
    which samples (and in what share) it came from."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, c, *size).clone()
    return x, torch.arange(n)


def low_frequency_share(mask: torch.Tensor, cutoff: float = 0.125) -> float:
    """The share of the (mean-removed) mask's spectral energy at frequencies |f| <= cutoff."""
    m = mask - mask.mean()
    power = torch.fft.fft2(m).abs().pow(2)
    h, w = m.shape
    f = (torch.fft.fftfreq(h)[:, None] ** 2 + torch.fft.fftfreq(w)[None, :] ** 2).sqrt()
    return float(power[f <= cutoff].sum() / power.sum())


def edge_density(mask: torch.Tensor) -> float:
    """The share of neighbouring pixel pairs that differ (0: one blob, 0.5: salt and pepper)."""
    return float(((mask[1:] != mask[:-1]).float().mean() + (mask[:, 1:] != mask[:, :-1]).float().mean()) / 2)


# -- masks carry the fraction asked for ------------------------------------------------------------

@pytest.mark.parametrize("size", SIZES)
def test_fmix_mask_is_binary_with_mean_lambda(size):
    g, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    h, w = size
    for lam in [*LAMBDAS, *np.random.default_rng(1).uniform(size=40)]:
        for _ in range(3):  # both roundings
            mask = mixing.fmix_mask(float(lam), size, generator=g, rng=rng)
            assert mask.shape == size
            assert set(mask.unique().tolist()) <= {0.0, 1.0}
            assert abs(float(mask.mean()) - lam) <= 1 / (h * w) + 1e-7


def test_fmix_rounds_up_or_down_at_random():
    g, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    counts = {int(mixing.fmix_mask(0.5 + 0.3 / 64, (8, 8), generator=g, rng=rng).sum()) for _ in range(40)}
    assert counts == {32, 33}


@pytest.mark.parametrize("size", SIZES)
def test_cutmix_lambda_is_the_kept_fraction_exactly(size):
    rng = np.random.default_rng(0)
    h, w = size
    for lam in [*LAMBDAS, *np.random.default_rng(2).uniform(size=40)]:
        mask, kept = mixing.cutmix_mask(float(lam), size, rng=rng)
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        zeros = int((mask == 0).sum())
        assert kept == 1.0 - zeros / (h * w)  # the same float the kept fraction gives
        assert float(mask.mean()) == pytest.approx(kept, abs=1e-6)
        if zeros:  # the pasted region is one axis-aligned box
            rows, cols = (mask == 0).nonzero(as_tuple=True)
            box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            assert int(box) == zeros
        assert kept >= lam - 1e-12  # the box is at most (1 - lam) of the image (clipped at the border)


@pytest.mark.parametrize("method", ["cutmix", "fmix"])
def test_mixed_images_hold_lambda_of_their_own_image(method):
    x, y = labelled_batch()
    h, w = x.shape[-2:]
    for seed in range(20):
        m = mixing.mix(x, y, method, generator=torch.Generator().manual_seed(seed), rng=np.random.default_rng(seed))
        assert torch.equal(m.y_a, y) and sorted(m.y_b.tolist()) == y.tolist()
        own = (m.x == y.view(-1, 1, 1, 1).float()).float()
        other = (m.x == m.y_b.view(-1, 1, 1, 1).float()).float()
        assert torch.all((own + other) >= 1)  # every pixel comes from one of the two images
        pasted = (m.y_a != m.y_b)
        share = own[pasted].mean(dim=(1, 2, 3))  # one mask for every sample and channel
        assert torch.all(share == share[0])
        tol = 1e-6 if method == "cutmix" else 1 / (h * w) + 1e-6
        assert float(share[0]) == pytest.approx(m.lam, abs=tol)


def test_mixup_is_the_convex_combination_with_the_paired_sample():
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(16)
    for seed in range(5):
        m = mixing.mix(x, y, "mixup", generator=torch.Generator().manual_seed(seed), rng=np.random.default_rng(seed))
        perm = m.y_b  # y = arange: the labels are the pairing
        assert 0 <= m.lam <= 1 and torch.equal(m.y_a, y)
        assert torch.allclose(m.x, m.lam * x + (1 - m.lam) * x[perm], atol=1e-6)


def test_lambda_is_beta_alpha_alpha():
    rng = np.random.default_rng(0)
    uniform = np.array([mixing.sample_lambda(1.0, rng) for _ in range(4000)])
    assert abs(uniform.mean() - 0.5) < 0.02 and abs(uniform.var() - 1 / 12) < 0.005
    u_shaped = np.array([mixing.sample_lambda(0.2, rng) for _ in range(4000)])
    assert ((u_shaped < 0.1) | (u_shaped > 0.9)).mean() > 0.5  # Beta(0.2, 0.2) piles up at 0 and 1


# -- FMix masks are low-frequency -------------------------------------------------------------------

def test_fmix_masks_are_low_frequency_unlike_random_masks():
    g, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    fmix = [mixing.fmix_mask(0.5, (32, 32), 3.0, generator=g, rng=rng) for _ in range(30)]
    shuffled = [m.flatten()[torch.randperm(1024, generator=g)].view(32, 32) for m in fmix]  # same fraction
    # measured: FMix (decay 3) >= 0.80 of the energy below |f| = 1/8, a random binary mask ~0.05
    assert min(low_frequency_share(m) for m in fmix) > 0.5
    assert max(low_frequency_share(m) for m in shuffled) < 0.15
    assert np.mean([edge_density(m) for m in fmix]) < 0.1 < 0.4 < np.mean([edge_density(m) for m in shuffled])


def test_higher_decay_power_gives_smoother_masks():
    def mean_edges(decay):
        g, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
        return np.mean([edge_density(mixing.fmix_mask(0.5, (32, 32), decay, generator=g, rng=rng))
                        for _ in range(30)])

    edges = [mean_edges(d) for d in (0.5, 1.0, 2.0, 3.0)]  # measured ~0.41, 0.28, 0.09, 0.05
    assert all(a > b for a, b in zip(edges, edges[1:]))
    assert edges[0] > 2 * edges[-1]


# -- determinism ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", mixing.METHODS)
def test_seeded_mixing_is_deterministic(method):
    x, y = torch.rand(8, 1, 12, 12, generator=torch.Generator().manual_seed(0)), torch.arange(8)

    def run(seed):
        return mixing.mix(x, y, method, generator=torch.Generator().manual_seed(seed), rng=np.random.default_rng(seed))

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.x, b.x) and torch.equal(a.y_b, b.y_b) and a.lam == b.lam
    assert a.lam != c.lam
    model = models.create("preactresnet18", 8, 1, width=4).train()
    la, lb = mixing.loss_fn(method, seed=3), mixing.loss_fn(method, seed=3)
    for _ in range(3):  # the same sequence of batches from the same seed
        assert torch.equal(la(model, x, y)[0], lb(model, x, y)[0])


def test_unseeded_calls_differ_and_follow_torch_manual_seed():
    x, y = torch.rand(8, 1, 12, 12), torch.arange(8)
    torch.manual_seed(0)
    first = [mixing.mix(x, y, "fmix") for _ in range(3)]
    assert len({m.lam for m in first}) == 3  # a fresh lambda per call
    torch.manual_seed(0)
    again = [mixing.mix(x, y, "fmix") for _ in range(3)]
    assert all(a.lam == b.lam and torch.equal(a.x, b.x) for a, b in zip(first, again))


# -- the loss ---------------------------------------------------------------------------------------

def test_mixed_cross_entropy_is_the_weighted_sum():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 5, generator=g)
    y_a, y_b = torch.randint(0, 5, (10,), generator=g), torch.randint(0, 5, (10,), generator=g)
    for lam in (0.0, 0.3, 1.0):
        mixed = mixing.Mixed(torch.zeros(10, 1, 2, 2), y_a, y_b, lam)
        logp = logits.log_softmax(1)
        expected = -(lam * logp[torch.arange(10), y_a] + (1 - lam) * logp[torch.arange(10), y_b]).mean()
        assert float(mixing.mixed_cross_entropy(logits, mixed)) == pytest.approx(float(expected), rel=1e-6)
    same = mixing.Mixed(torch.zeros(10, 1, 2, 2), y_a, y_a, 0.37)
    assert float(mixing.mixed_cross_entropy(logits, same)) == pytest.approx(float(F.cross_entropy(logits, y_a)))


def learnable_bundle(n=64):
    """Four classes, each a bright quadrant of a 1x12x12 image (plus noise)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 4
    x = torch.rand(n, 1, 12, 12, generator=g) * 60
    for c, (r, q) in enumerate([(0, 0), (0, 6), (6, 0), (6, 6)]):
        x[y == c, :, r:r + 6, q:q + 6] += 180
    x = x.to(torch.uint8)
    return data.TensorBundle("quadrants", x, y, x[:8].clone(), y[:8].clone(), 4, (0.5,), (0.25,))


@pytest.mark.parametrize("method", mixing.METHODS)
def test_loss_fn_trains_inside_fit(method):
    torch.manual_seed(0)
    model = models.create("preactresnet18", 4, 1, width=4)
    recipe = train.Recipe(epochs=6, batch_size=16, lr=0.05, augment=False)
    history = train.fit(model, learnable_bundle(), recipe, loss_fn=mixing.loss_fn(method, seed=0), progress=False)
    assert all(math.isfinite(v) for v in history.loss)
    first, last = np.mean(history.loss[:2]), np.mean(history.loss[-2:])
    assert last < first - 0.2, history.loss


# -- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda: mixing.check("cutout"),
    lambda: mixing.mix(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), "cutout"),
    lambda: mixing.loss_fn("cutout"),
])
def test_unknown_method_lists_the_choices(call):
    with pytest.raises(ValueError, match="cutout.*mixup, cutmix, fmix"):
        call()


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_alpha_must_be_positive(alpha):
    with pytest.raises(ValueError, match="alpha"):
        mixing.loss_fn("mixup", alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        mixing.mix(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), "cutmix", alpha=alpha)


@pytest.mark.parametrize("decay", [0.0, -3.0, float("nan")])
def test_decay_power_must_be_positive(decay):
    with pytest.raises(ValueError, match="decay_power"):
        mixing.loss_fn("fmix", decay_power=decay)
    with pytest.raises(ValueError, match="decay_power"):
        mixing.check("fmix", decay_power=decay)
