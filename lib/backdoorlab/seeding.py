"""Independent random streams from a run's one seed.

An attacked setting has a single ``seed``, and the attack draws its poisoned samples with
``torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:pratio * N]``. Any other
draw over the same N training samples from that plain seed lists the same samples first:
a defender's "random" 5 % clean subset would be nothing but the clean twins of poisoned
images (never seen clean in training), and EP's "random" training sample nothing but
poisoned images. A draw that must be independent of the poisoning takes its own named
stream instead:

>>> order = torch.randperm(n, generator=seeding.stream(seed, "clean-subset"))
"""
from __future__ import annotations

import hashlib

import torch


def stream(seed: int, name: str) -> torch.Generator:
    """A CPU generator for the random stream ``name`` of run ``seed``: the same on every
    machine, and unrelated to other names and to ``torch.Generator().manual_seed(seed)``."""
    if not name:
        raise ValueError("a random stream needs a name")
    digest = hashlib.sha256(f"{name}:{int(seed)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
