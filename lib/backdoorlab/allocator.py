"""Keep freed CPU memory in the process for reuse (Linux with glibc).

glibc serves an allocation above its mmap threshold with fresh pages from the kernel and
hands them back when the block is freed; it also trims free memory off the top of the
heap. The threshold adapts to the program, but late and not always. A batch of 512
colour 32x32 images in float32 is 6 MB, so a CPU training step or poisoning kernel can
pay for zeroed pages on every call. On the 2-core CI machine we measured poisoning
kernels up to 20x slower on 3x32x32 data (``benchmarks/attacks.py --data
synthetic-cifar``) and training 25-40 % slower (``benchmarks/train_throughput.py``).

Fixing both thresholds (mmap above 32 MiB only, trim above 1 GiB only) lets freed blocks
be reused, as PyTorch's caching allocator does on a GPU. The cost: the process keeps
close to its peak memory until it exits. :func:`keep_freed_memory` runs once when
``backdoorlab`` is imported; ``BACKDOORLAB_MALLOC=system`` keeps glibc's defaults.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # bytes: larger blocks still come from mmap
TRIM_THRESHOLD = 1 << 30  # bytes of free memory at the top of the heap before it is given back
CHOICES = ("reuse", "system")


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (see the module docstring). Returns whether they
    were set: False on other platforms or C libraries, and with ``BACKDOORLAB_MALLOC=system``."""
    choice = os.environ.get("BACKDOORLAB_MALLOC", "reuse")
    if choice not in CHOICES:
        raise ValueError(f"BACKDOORLAB_MALLOC must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc (musl has no such thresholds)
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
