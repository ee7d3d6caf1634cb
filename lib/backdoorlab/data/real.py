"""Real datasets: CIFAR-10, CIFAR-100, GTSRB and Tiny-ImageNet.

Files are fetched with torchvision's download helpers (checksummed) into
``paths.data_dir()/<name>`` (set ``BACKDOORLAB_DATA`` to choose the folder). Nothing
is unpickled: CIFAR is read from its *binary* release, GTSRB and Tiny-ImageNet from
their image files. Decoded arrays are cached beside the files as safetensors.
When the files are absent and cannot be downloaded, ``DatasetNotAvailable`` names
the folder to put them in.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import paths
from .bundle import TensorBundle

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"
CIFAR100_MD5 = "03b5dce01913d631647c71ecec9e9cb8"
TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"


class DatasetNotAvailable(FileNotFoundError):
    """The dataset's files are missing and could not be downloaded."""


def _fetch(root: Path, name: str, present: Callable[[], bool], download: Callable[[], None], allow: bool, url: str) -> None:
    if present():
        return
    problem = "download=False was given"
    if allow:
        try:
            download()
        except Exception as err:  # network down, DNS failure, checksum mismatch ...
            problem = f"the download failed ({type(err).__name__}: {err})"
        if present():
            return
    raise DatasetNotAvailable(
        f"dataset {name!r} is not in {root} and {problem}. Download {url} on a machine with "
        f"network access and extract it into {root} (the data folder is set by the environment "
        f"variable BACKDOORLAB_DATA, now {paths.data_dir()})."
    )


def _cached(root: Path, build: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file, save_file

    from ..runs import atomic_path

    cache = root / "backdoorlab-uint8.safetensors"
    if cache.exists():
        return load_file(str(cache))
    arrays = {k: v.contiguous() for k, v in build().items()}
    with atomic_path(cache) as tmp:
        save_file(arrays, str(tmp))
    return arrays


def _read_cifar_bin(files: list[Path], label_bytes: int, label_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    record = label_bytes + 3 * 32 * 32
    raw = np.concatenate([np.fromfile(f, dtype=np.uint8) for f in files])
    if raw.size % record:
        raise ValueError(f"CIFAR binary files {files} are truncated ({raw.size} bytes is not a multiple of {record})")
    raw = raw.reshape(-1, record)
    y = torch.from_numpy(raw[:, label_index].astype(np.int64))
    x = torch.from_numpy(raw[:, label_bytes:].reshape(-1, 3, 32, 32).copy())
    return x, y


def load_cifar10(download: bool = True) -> TensorBundle:
    root = paths.data_dir() / "cifar10"
    folder = root / "cifar-10-batches-bin"
    train_files = [folder / f"data_batch_{i}.bin" for i in range(1, 6)]
    test_files = [folder / "test_batch.bin"]

    def fetch() -> None:
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(CIFAR10_URL, str(root), md5=CIFAR10_MD5)

    _fetch(root, "cifar10", lambda: all(f.exists() for f in train_files + test_files), fetch, download, CIFAR10_URL)

    def build() -> dict[str, torch.Tensor]:
        tx, ty = _read_cifar_bin(train_files, 1, 0)
        vx, vy = _read_cifar_bin(test_files, 1, 0)
        return {"train_x": tx, "train_y": ty, "test_x": vx, "test_y": vy}

    a = _cached(root, build)
    return TensorBundle("cifar10", a["train_x"], a["train_y"], a["test_x"], a["test_y"], 10,
                        mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.243, 0.261), flip=True, crop_padding=4)


def load_cifar100(download: bool = True) -> TensorBundle:
    root = paths.data_dir() / "cifar100"
    folder = root / "cifar-100-binary"
    files = {"train": [folder / "train.bin"], "test": [folder / "test.bin"]}

    def fetch() -> None:
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(CIFAR100_URL, str(root), md5=CIFAR100_MD5)

    _fetch(root, "cifar100", lambda: all(f.exists() for f in files["train"] + files["test"]), fetch, download, CIFAR100_URL)

    def build() -> dict[str, torch.Tensor]:
        tx, ty = _read_cifar_bin(files["train"], 2, 1)  # (coarse, fine) label bytes; fine labels
        vx, vy = _read_cifar_bin(files["test"], 2, 1)
        return {"train_x": tx, "train_y": ty, "test_x": vx, "test_y": vy}

    a = _cached(root, build)
    return TensorBundle("cifar100", a["train_x"], a["train_y"], a["test_x"], a["test_y"], 100,
                        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), flip=False, crop_padding=4)


def _images_to_uint8(files: list[Path], size: int) -> torch.Tensor:
    from PIL import Image

    out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, f in enumerate(files):  # decoding is per file by nature; done once, then cached
        with Image.open(f) as im:
            out[i] = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def load_gtsrb(download: bool = True) -> TensorBundle:
    """GTSRB (43 classes), resized to 32x32 as BackdoorBench does; no flip, mean 0 / std 1."""
    from torchvision.datasets import GTSRB

    root = paths.data_dir() / "gtsrb"
    base = root / "gtsrb"  # torchvision's layout: <root>/gtsrb/GTSRB/Training, GT-final_test.csv ...

    def present() -> bool:
        return (base / "GTSRB" / "Training").is_dir() and (base / "GT-final_test.csv").exists()

    def fetch() -> None:
        for split in ("train", "test"):
            GTSRB(str(root), split=split, download=True)

    _fetch(root, "gtsrb", present, fetch, download, "the GTSRB archives (see torchvision.datasets.GTSRB)")

    def build() -> dict[str, torch.Tensor]:
        train_files = sorted((base / "GTSRB" / "Training").glob("*/*.ppm"))
        train_y = torch.tensor([int(f.parent.name) for f in train_files], dtype=torch.int64)
        with open(base / "GT-final_test.csv", newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter=";"))
        test_files = [base / "GTSRB" / "Final_Test" / "Images" / r["Filename"] for r in rows]
        test_y = torch.tensor([int(r["ClassId"]) for r in rows], dtype=torch.int64)
        return {"train_x": _images_to_uint8(train_files, 32), "train_y": train_y,
                "test_x": _images_to_uint8(test_files, 32), "test_y": test_y}

    a = _cached(root, build)
    return TensorBundle("gtsrb", a["train_x"], a["train_y"], a["test_x"], a["test_y"], 43,
                        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), flip=False, crop_padding=4)


def load_tiny_imagenet(download: bool = True) -> TensorBundle:
    """Tiny-ImageNet-200 (64x64); the labelled validation split serves as the test set."""
    root = paths.data_dir() / "tiny-imagenet"
    base = root / "tiny-imagenet-200"

    def present() -> bool:
        return (base / "wnids.txt").exists() and (base / "val" / "val_annotations.txt").exists()

    def fetch() -> None:
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(TINY_URL, str(root), md5=TINY_MD5)

    _fetch(root, "tiny-imagenet", present, fetch, download, TINY_URL)

    def build() -> dict[str, torch.Tensor]:
        wnids = (base / "wnids.txt").read_text().split()
        index = {w: i for i, w in enumerate(wnids)}
        train_files = sorted((base / "train").glob("*/images/*.JPEG"))
        train_y = torch.tensor([index[f.parent.parent.name] for f in train_files], dtype=torch.int64)
        lines = [l.split("\t") for l in (base / "val" / "val_annotations.txt").read_text().splitlines() if l.strip()]
        test_files = [base / "val" / "images" / l[0] for l in lines]
        test_y = torch.tensor([index[l[1]] for l in lines], dtype=torch.int64)
        return {"train_x": _images_to_uint8(train_files, 64), "train_y": train_y,
                "test_x": _images_to_uint8(test_files, 64), "test_y": test_y}

    a = _cached(root, build)
    return TensorBundle("tiny-imagenet", a["train_x"], a["train_y"], a["test_x"], a["test_y"], 200,
                        mean=(0.4802, 0.4481, 0.3975), std=(0.2302, 0.2265, 0.2262), flip=False, crop_padding=4)
