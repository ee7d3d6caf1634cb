"""backdoorlab: batched, device-resident kernels for backdoor attacks, defenses and
their evaluation, behind one parameterised notebook per paper."""
__version__ = "0.1.0"
