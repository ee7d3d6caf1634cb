"""BppAttack: quantisation, batched Floyd-Steinberg dithering and negative samples."""
import numpy as np
import pytest
import torch

from backdoorlab import attacks
from backdoorlab.attacks.bpp import floyd_steinberg


def naive_dither(img, levels):
    """Pixel-by-pixel Floyd-Steinberg (the textbook loop) for one image."""
    q = levels - 1
    a = img.double().numpy().copy()
    out = np.zeros_like(a)
    c, h, w = a.shape
    for ch in range(c):
        for i in range(h):
            for j in range(w):
                v = a[ch, i, j]
                out[ch, i, j] = np.round(min(max(v, 0.0), 1.0) * q) / q
                e = v - out[ch, i, j]
                if j + 1 < w:
                    a[ch, i, j + 1] += e * 7 / 16
                if i + 1 < h:
                    if j > 0:
                        a[ch, i + 1, j - 1] += e * 3 / 16
                    a[ch, i + 1, j] += e * 5 / 16
                    if j + 1 < w:
                        a[ch, i + 1, j + 1] += e / 16
    return torch.from_numpy(out)


def test_quantisation_to_squeeze_num_levels():
    attack = attacks.create("bpp", squeeze_num=8)
    x = torch.rand(4, 3, 32, 32)
    out = attack.apply(x)
    levels = out * 7
    assert torch.allclose(levels, levels.round(), atol=1e-5)
    assert (out - x).abs().max() <= 1 / 14 + 1e-6
    assert torch.equal(attack.apply(out), out)  # idempotent


def test_dithering_matches_the_textbook_loop_and_is_batched():
    x = torch.rand(3, 2, 9, 11)
    out = floyd_steinberg(x, 8)
    for i in range(3):
        assert torch.allclose(out[i].double(), naive_dither(x[i], 8), atol=1e-6)
    dithered = attacks.create("bpp", dithering=True)
    assert torch.allclose(dithered.apply(x), torch.cat([dithered.apply(x[i:i + 1]) for i in range(3)]))
    flat = torch.full((1, 1, 16, 16), 0.3)
    assert abs(floyd_steinberg(flat, 2).mean().item() - 0.3) < 0.05  # dithering keeps the mean


def test_training_batch_poisoned_and_negative_samples():
    attack = attacks.create("bpp")
    attack.prepare(None, seed=0)
    attack.begin_training(None, type("D", (), {"device": torch.device("cpu")})(), None)
    x, y = torch.rand(40, 3, 32, 32), torch.randint(1, 10, (40,))
    mask = torch.zeros(40, dtype=torch.bool)
    mask[:4] = True
    px, py = attack.training_batch(x, y, mask, torch.arange(40), 10)
    assert torch.equal(px[:4], attack.apply(x[:4])) and (py[:4] == 0).all()
    changed = (px != x).flatten(1).any(1)
    assert int(changed[4:].sum()) == int(40 * 0.1)  # neg_ratio of the batch
    assert torch.equal(py[4:], y[4:])  # negatives keep their labels
    negatives = torch.nonzero(changed[4:]).squeeze(1) + 4
    assert not torch.allclose(px[negatives], attack.apply(x[negatives]))  # not the image's own quantisation
    assert (px[negatives] - x[negatives]).abs().max() <= 1 / 14 + 1e-6  # another image's quantisation residual


@pytest.mark.parametrize("kwargs, match", [
    ({"squeeze_num": 1}, "squeeze_num must be an integer in 2..255"),
    ({"neg_ratio": 1.0}, r"neg_ratio must be in \[0, 1\)"),
    ({"dithering": "yes"}, "dithering must be True or False"),
])
def test_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        attacks.create("bpp", **kwargs)
