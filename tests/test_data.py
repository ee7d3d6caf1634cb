import gzip
import io
import tarfile
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from backdoorlab import attacks, data, seeding
from backdoorlab.data import augment, real


def test_mnist5k_is_the_real_bundled_digits(mnist):
    assert mnist.train_x.shape == (4000, 1, 28, 28) and mnist.test_x.shape == (1000, 1, 28, 28)
    assert mnist.train_x.dtype == torch.uint8 and mnist.train_y.dtype == torch.int64
    assert torch.bincount(mnist.train_y).tolist() == [400] * 10
    assert torch.bincount(mnist.test_y).tolist() == [100] * 10
    # real digits: dark background, bright strokes, mean intensity near MNIST's 0.13
    assert 0.08 < mnist.train_x.float().mean().item() / 255 < 0.2
    assert mnist.num_classes == 10 and not mnist.flip


def test_mnist5k_split_is_deterministic_and_disjoint(mnist):
    again = data.load("mnist5k")
    assert torch.equal(again.train_x, mnist.train_x) and torch.equal(again.test_y, mnist.test_y)
    train_rows = {bytes(r) for r in mnist.train_x.flatten(1).numpy()}
    assert not any(bytes(r) in train_rows for r in mnist.test_x.flatten(1).numpy())
    assert len(set(mnist.test_y[:100].tolist())) == 10  # prefixes are class-mixed


def test_augment_crop_is_a_shift_and_flip_mirrors():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    assert torch.equal(augment(x, 0, False), x)
    g = torch.Generator().manual_seed(0)
    out = augment(x, 2, False, g)
    assert out.shape == x.shape
    for i in range(2):  # every crop equals the padded image shifted by some offset
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        assert any(torch.equal(out[i], padded[:, a:a + 6, b:b + 6]) for a in range(5) for b in range(5))
    flipped = augment(x, 0, True, torch.Generator().manual_seed(1))
    for i in range(2):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))


def test_augment_flips_about_half_and_is_seeded():
    x = torch.rand(400, 3, 8, 8)
    a = augment(x, 0, True, torch.Generator().manual_seed(3))
    b = augment(x, 0, True, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    flipped = (a != x).flatten(1).any(1).float().mean().item()
    assert 0.35 < flipped < 0.65


def test_clean_subset_is_seeded_and_sized(mnist):
    idx = data.clean_subset(mnist, 0.05, seed=0)
    assert len(idx) == 200 and len(set(idx.tolist())) == 200
    assert torch.equal(idx, data.clean_subset(mnist, 0.05, seed=0))
    assert not torch.equal(idx, data.clean_subset(mnist, 0.05, seed=1))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        data.clean_subset(mnist, 0.0)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_the_clean_subset_is_drawn_independently_of_the_poisoned_samples(mnist, seed):
    # BadNets of the same seed poisons 400 of 4000 samples; a random 200-sample subset holds ~20 of them (sd ~4).
    # Drawn from the attack's own stream, all 200 would be poisoned ones (and all 10 per-class picks too).
    poisoned = set(attacks.create("badnets").poison_indices(mnist.train_y, 0.1, seed=seed).tolist())
    shared = len(poisoned & set(data.clean_subset(mnist, 0.05, seed=seed).tolist()))
    assert 5 <= shared <= 40
    assert len(poisoned & set(data.clean_subset(mnist, seed=seed, per_class=5).tolist())) <= 15


def test_named_random_streams_are_reproducible_and_distinct():
    draw = lambda g: torch.randperm(100, generator=g)[:10].tolist()  # noqa: E731
    assert draw(seeding.stream(3, "a")) == draw(seeding.stream(3, "a"))
    others = [seeding.stream(3, "b"), seeding.stream(4, "a"), torch.Generator().manual_seed(3)]
    assert all(draw(g) != draw(seeding.stream(3, "a")) for g in others)
    with pytest.raises(ValueError, match="needs a name"):
        seeding.stream(0, "")


# -- real loaders, on small files written in each dataset's own format ---------------------------

@pytest.fixture
def data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("BACKDOORLAB_DATA", str(tmp_path))
    return tmp_path


def _cifar_records(n, label_bytes, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=(n, label_bytes), dtype=np.uint8)
    pixels = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    return np.concatenate([labels, pixels], axis=1), labels, pixels


def test_cifar10_binary_loader(data_home):
    folder = data_home / "cifar10" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    expected = []
    for i, name in enumerate([f"data_batch_{k}.bin" for k in range(1, 6)] + ["test_batch.bin"]):
        records, labels, pixels = _cifar_records(4, 1, i)
        (folder / name).write_bytes(records.tobytes())
        expected.append((labels[:, 0], pixels))
    bundle = data.load("cifar10", download=False)
    assert bundle.train_x.shape == (20, 3, 32, 32) and bundle.test_x.shape == (4, 3, 32, 32)
    assert bundle.train_y[:4].tolist() == expected[0][0].tolist()
    assert torch.equal(bundle.train_x[0].flatten(), torch.from_numpy(expected[0][1][0]))
    assert bundle.test_y.tolist() == expected[5][0].tolist() and bundle.flip
    assert (data_home / "cifar10" / "backdoorlab-uint8.safetensors").exists()


def test_cifar100_binary_loader_uses_fine_labels(data_home):
    folder = data_home / "cifar100" / "cifar-100-binary"
    folder.mkdir(parents=True)
    train, tl, _ = _cifar_records(6, 2, 0)
    test, vl, _ = _cifar_records(3, 2, 1)
    (folder / "train.bin").write_bytes(train.tobytes())
    (folder / "test.bin").write_bytes(test.tobytes())
    bundle = data.load("cifar100", download=False)
    assert bundle.train_y.tolist() == tl[:, 1].tolist() and bundle.test_y.tolist() == vl[:, 1].tolist()
    assert bundle.num_classes == 100


def test_truncated_cifar_file_is_reported(data_home):
    folder = data_home / "cifar100" / "cifar-100-binary"
    folder.mkdir(parents=True)
    (folder / "train.bin").write_bytes(b"\x00" * 100)
    (folder / "test.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="truncated"):
        data.load("cifar100", download=False)


def test_gtsrb_loader_reads_torchvision_layout(data_home):
    base = data_home / "gtsrb" / "gtsrb"
    for cls in (0, 2):
        d = base / "GTSRB" / "Training" / f"{cls:05d}"
        d.mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (40, 37), color=(cls * 100, 10 * k, 0)).save(d / f"00000_{k:05d}.ppm")
    test_dir = base / "GTSRB" / "Final_Test" / "Images"
    test_dir.mkdir(parents=True)
    lines = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for k, cls in enumerate([2, 0, 42]):
        Image.new("RGB", (30, 31), color=(0, 0, 200)).save(test_dir / f"{k:05d}.ppm")
        lines.append(f"{k:05d}.ppm;30;31;0;0;29;30;{cls}")
    (base / "GT-final_test.csv").write_text("\n".join(lines) + "\n")
    bundle = data.load("gtsrb", download=False)
    assert bundle.train_x.shape == (4, 3, 32, 32) and bundle.test_x.shape == (3, 3, 32, 32)
    assert sorted(bundle.train_y.tolist()) == [0, 0, 2, 2] and bundle.test_y.tolist() == [2, 0, 42]
    assert bundle.num_classes == 43 and bundle.train_x[bundle.train_y == 2][:, 0].float().mean() == 200


def test_tiny_imagenet_loader(data_home):
    base = data_home / "tiny-imagenet" / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819"]
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w in wnids:
        d = base / "train" / w / "images"
        d.mkdir(parents=True)
        for k in range(3):
            Image.new("RGB", (64, 64), color=(50, 50, 50)).save(d / f"{w}_{k}.JPEG")
    ann = []
    for k, w in enumerate([wnids[1], wnids[0]]):
        Image.new("RGB", (64, 64), color=(200, 0, 0)).save(base / "val" / "images" / f"val_{k}.JPEG")
        ann.append(f"val_{k}.JPEG\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    bundle = data.load("tiny-imagenet", download=False)
    assert bundle.train_x.shape == (6, 3, 64, 64) and bundle.test_y.tolist() == [1, 0]
    assert sorted(bundle.train_y.tolist()) == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "gtsrb", "tiny-imagenet"])
def test_missing_dataset_offline_names_the_folder(data_home, name):
    with pytest.raises(data.DatasetNotAvailable) as err:
        data.load(name, download=False)
    message = str(err.value)
    assert str(data_home / name) in message and "BACKDOORLAB_DATA" in message


def test_failed_download_names_the_folder(data_home, monkeypatch):
    import torchvision.datasets.utils as tvu

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    with pytest.raises(data.DatasetNotAvailable, match="download failed.*unreachable") as err:
        data.load("cifar10")
    assert str(data_home / "cifar10") in str(err.value)


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError, match="unknown dataset 'cifar11'.*cifar10.*mnist5k"):
        data.load("cifar11")


def test_synthetic_cifar_is_seeded_and_cifar_shaped():
    a = data.synthetic_cifar(64)
    assert a.train_x.shape == (64, 3, 32, 32) and a.train_x.dtype == torch.uint8 and a.num_classes == 10
    assert torch.equal(a.train_x, data.synthetic_cifar(64).train_x)
    assert not torch.equal(a.train_x, data.synthetic_cifar(64, seed=1).train_x)


def test_clean_subset_per_class_is_class_balanced(mnist):
    for k in (1, 3):
        idx = data.clean_subset(mnist, seed=0, per_class=k)
        counts = torch.bincount(mnist.train_y[idx], minlength=mnist.num_classes)
        assert torch.all(counts == k) and len(idx.unique()) == len(idx)
    assert not torch.equal(data.clean_subset(mnist, per_class=1, seed=0), data.clean_subset(mnist, per_class=1, seed=1))
    with pytest.raises(ValueError, match="per_class must be in"):
        data.clean_subset(mnist, per_class=0)
