"""Looking inside a model: Grad-CAM finds the BadNets patch, the loss landscape leaves the
weights as they were and is centred on the model's loss, confusion counts match a brute
force, t-SNE and neuron tables have the right shape, and the trigger drives some channels."""
import matplotlib
import pytest
import torch
import torch.nn.functional as F

from backdoorlab import figures, inspection
from backdoorlab.data.bundle import to_float
from tiny import tiny_model

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _runs(tmp_path, monkeypatch):
    monkeypatch.setenv("BACKDOORLAB_RUNS", str(tmp_path))


def clean_and_poisoned(result, n: int = 128):
    """The first ``n`` non-target test images, clean and with the trigger."""
    data, attack = result.data, result.attack
    keep = attack.test_mask(data.test_y)
    x, y = to_float(data.test_x[keep][:n]), data.test_y[keep][:n]
    return x, attack.apply(x), y


def test_features_are_the_penultimate_layer():
    model = tiny_model()
    x = torch.randint(0, 256, (5, 1, 12, 12), dtype=torch.uint8)
    z = inspection.features(model, x, batch_size=2)
    assert z.shape == (5, model.linear.in_features)
    torch.testing.assert_close(model.classify(z), model(to_float(x)))
    with pytest.raises(ValueError, match="N, C, H, W"):
        inspection.features(model, x[0])


def test_tsne_shape_and_labels():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    clean, poisoned = torch.rand(30, 1, 12, 12, generator=g), torch.rand(12, 1, 12, 12, generator=g)
    y = torch.arange(30) % 4
    frame = inspection.tsne_embedding(model, clean, poisoned, clean_y=y, n=20, seed=0)
    assert len(frame) == 20 + 12 and list(frame.columns) == ["x", "y", "group", "predicted", "label"]
    assert (frame.group == "clean").sum() == 20 and (frame.group == "poisoned").sum() == 12
    assert frame[["x", "y"]].notna().all().all() and frame[["x", "y"]].std().min() > 0
    assert set(frame.loc[frame.group == "clean", "label"]) <= {0, 1, 2, 3}
    poisoned_rows = frame[frame.group == "poisoned"]
    assert (poisoned_rows.label == poisoned_rows.predicted).all()  # no poisoned_y: the predicted class
    again = inspection.tsne_embedding(model, clean, poisoned, clean_y=y, n=20, seed=0)
    assert again.equals(frame)  # seeded
    with pytest.raises(ValueError, match="clean_y must have shape"):
        inspection.tsne_embedding(model, clean, poisoned, clean_y=y[:3])


def test_grad_cam_looks_at_the_badnets_patch(badnets_result):
    model = badnets_result.model
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}  # set by training
    clean, poisoned, _ = clean_and_poisoned(badnets_result)
    maps = inspection.grad_cam(model, poisoned, batch_size=50)
    h, w = poisoned.shape[-2:]
    assert maps.shape == (len(poisoned), h, w) and maps.min() >= 0 and maps.max() <= 1
    assert torch.allclose(maps.flatten(1).max(1).values, torch.ones(len(maps)))
    mask = badnets_result.attack.mask(h, w, poisoned.device)[0, 0].bool()
    side = int(mask.sum() ** 0.5)
    trigger_mass = maps[:, mask].mean()
    # random windows of the same size, anywhere above the patch rows (so none overlaps it)
    g = torch.Generator().manual_seed(0)
    tops = torch.randint(0, h - 2 * side, (200,), generator=g)
    lefts = torch.randint(0, w - side + 1, (200,), generator=g)
    rows = tops[:, None, None] + torch.arange(side)[None, :, None]
    cols = lefts[:, None, None] + torch.arange(side)[None, None, :]
    random_mass = maps[:, rows, cols].mean()
    assert trigger_mass > 1.5 * random_mass, (float(trigger_mass), float(random_mass))
    # and the trigger pulls the map onto itself: the same images without it look elsewhere
    # (measured: 0.78 vs 0.22 for the 1-thread smoke model, 0.58 vs 0.31 for make test's 2-thread one)
    clean_mass = inspection.grad_cam(model, clean)[:, mask].mean()
    assert trigger_mass > 1.5 * clean_mass, (float(trigger_mass), float(clean_mass))
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    for n, p in model.named_parameters():  # Grad-CAM takes gradients of the activations only
        assert (p.grad is None and grads[n] is None) or torch.equal(p.grad, grads[n])


def test_grad_cam_input_checks():
    model = tiny_model()
    x = torch.rand(3, 1, 12, 12)
    assert inspection.grad_cam(model, x, target=2, layer="layer3").shape == (3, 12, 12)
    with pytest.raises(ValueError, match="valid choices include: .*layer4"):
        inspection.grad_cam(model, x, layer="layer9")
    with pytest.raises(ValueError, match=r"0\.\.3"):
        inspection.grad_cam(model, x, target=4)
    with pytest.raises(ValueError, match=r"\[N, C, h, w\] output; 'linear'"):
        inspection.grad_cam(model, x, layer="linear")
    with pytest.raises(ValueError, match="one class per image"):
        inspection.grad_cam(model, x, target=torch.tensor([0, 1]))


def test_trigger_drives_channels_of_the_backdoored_model_more_than_of_a_clean_one(badnets_result, clean_result):
    clean_x, poisoned_x, _ = clean_and_poisoned(badnets_result)
    frame = inspection.neuron_activation(badnets_result.model, clean_x, poisoned_x)
    channels = badnets_result.model.layer4[-1].conv2.out_channels
    assert len(frame) == channels and sorted(frame.channel) == list(range(channels))
    assert list(frame.columns) == ["channel", "clean", "backdoor", "difference", "rank"]
    assert frame.difference.is_monotonic_decreasing
    top = frame.iloc[0]
    assert top.backdoor > top.clean
    # the same trigger moves the clean model's channels far less
    reference = inspection.neuron_activation(clean_result.model, clean_x, poisoned_x)
    assert top.difference > 2 * reference.difference.iloc[0]
    # the per-channel means are the pooled penultimate features
    z = inspection.features(badnets_result.model, clean_x).mean(0)
    torch.testing.assert_close(torch.tensor(frame.sort_values("channel").clean.to_numpy()), z, rtol=1e-4, atol=1e-5)


def test_loss_landscape_is_centred_on_the_model_and_restores_it(badnets_result):
    model = badnets_result.model
    data = badnets_result.data
    x, y = to_float(data.test_x[:64]), data.test_y[:64]
    before = {n: t.clone() for n, t in model.state_dict().items()}
    frame = inspection.loss_landscape(model, x, y, directions=2, steps=3, span=0.5, seed=1, batch_size=64)
    assert len(frame) == 9 and list(frame.columns) == ["alpha", "beta", "loss", "accuracy"]
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())  # bit for bit
    with torch.no_grad():
        logits = model(x)
    centre = frame[(frame.alpha == 0) & (frame.beta == 0)].iloc[0]
    assert centre.loss == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)
    assert centre.accuracy == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert frame.loss.max() > centre.loss  # moving away from the trained weights costs something
    line = inspection.loss_landscape(model, x, y, steps=5, span=0.5, seed=1, batch_size=64)
    assert list(line.alpha) == [-0.5, -0.25, 0.0, 0.25, 0.5]
    assert line.equals(inspection.loss_landscape(model, x, y, steps=5, span=0.5, seed=1, batch_size=64))


def test_filter_normalised_direction():
    model = tiny_model()
    d = inspection.filter_normalized_direction(model, torch.Generator().manual_seed(0))
    w = model.layer2[0].conv1.weight
    torch.testing.assert_close(d["layer2.0.conv1.weight"].flatten(1).norm(dim=1), w.detach().flatten(1).norm(dim=1))
    assert torch.all(d["layer2.0.bn1.weight"] == 0) and torch.all(d["linear.bias"] == 0)


def test_loss_landscape_input_checks():
    model = tiny_model()
    x, y = torch.rand(4, 1, 12, 12), torch.arange(4)
    for bad, match in (({"directions": 3}, "directions must be 1 or 2"), ({"steps": 4}, "odd"),
                       ({"span": 0}, "span")):
        with pytest.raises(ValueError, match=match):
            inspection.loss_landscape(model, x, y, **bad)


def test_confusion_matrix_counts(badnets_result):
    model, data = badnets_result.model, badnets_result.data
    clean_x, poisoned_x, y = clean_and_poisoned(badnets_result, n=200)
    for x in (clean_x, poisoned_x):
        counts = inspection.confusion_matrix(model, x, y, data.num_classes, batch_size=64)
        assert counts.shape == (data.num_classes, data.num_classes) and counts.dtype == torch.int64
        assert torch.equal(counts.sum(1), torch.bincount(y, minlength=data.num_classes))
        with torch.no_grad():
            predicted = model(x).argmax(1)
        brute = torch.zeros_like(counts)
        for t, p in zip(y.tolist(), predicted.tolist()):
            brute[t, p] += 1
        assert torch.equal(counts, brute)
    uint8 = data.test_x[badnets_result.attack.test_mask(data.test_y)][:200]
    transformed = inspection.confusion_matrix(model, uint8, y, data.num_classes, transform=badnets_result.attack.apply)
    assert torch.equal(transformed, inspection.confusion_matrix(model, poisoned_x, y, data.num_classes))
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.9"):
        inspection.confusion_matrix(model, clean_x[:2], torch.tensor([0, 10]), data.num_classes)


def test_figures_draw(badnets_result):
    import matplotlib.pyplot as plt

    model = badnets_result.model
    clean_x, poisoned_x, y = clean_and_poisoned(badnets_result, n=24)
    tsne = inspection.tsne_embedding(model, clean_x, poisoned_x, clean_y=y, n=24)
    maps = inspection.grad_cam(model, poisoned_x[:4])
    neurons = inspection.neuron_activation(model, clean_x, poisoned_x)
    landscape = inspection.loss_landscape(model, clean_x, y, directions=2, steps=3).assign(inputs="clean")
    counts = inspection.confusion_matrix(model, poisoned_x, y, 10)
    for fig in (figures.tsne_scatter({"backdoored": tsne}),
                figures.grad_cam_grid({"poisoned": (poisoned_x, maps)}, n=4),
                figures.neuron_activation_plot({"backdoored": neurons}), figures.loss_landscape_plot(landscape),
                figures.loss_landscape_plot(landscape[landscape.beta == 0].drop(columns="beta")),
                figures.confusion_matrix_plot({"poisoned": counts})):
        assert fig.axes
        plt.close(fig)
    with pytest.raises(ValueError, match="non-empty mapping"):
        figures.tsne_scatter({})
    with pytest.raises(ValueError, match="value 'loss' or 'accuracy'"):
        figures.loss_landscape_plot(landscape, value="acc")
