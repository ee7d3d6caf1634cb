"""backdoorlab: batched, device-resident kernels for backdoor attacks, defenses and
their evaluation, behind one parameterised notebook per paper."""
__version__ = "0.1.0"

from .allocator import keep_freed_memory as _keep_freed_memory  # noqa: E402

_keep_freed_memory()  # CPU speed: reuse freed blocks (see allocator.py)
