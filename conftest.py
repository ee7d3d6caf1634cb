"""pytest hooks for the notebooks that ``make test`` runs under nbval.

nbval waits a fixed 5 s for each output message once a cell has finished; a cell that trained several
models can leave a backlog (progress widgets, logs) that takes longer to drain on a busy 2-core runner,
which nbval then reports as a failed cell. Give it a minute instead.
"""

NBVAL_OUTPUT_TIMEOUT_S = 60


def pytest_collection_modifyitems(items):
    for item in items:
        if hasattr(item, "output_timeout"):  # nbval's notebook cells
            item.output_timeout = NBVAL_OUTPUT_TIMEOUT_S
