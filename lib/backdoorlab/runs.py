"""Run folders, atomic writes and the one ``metrics.json`` schema.

Each notebook run writes ``runs/<Notebook>/<setting-id>/metrics.json`` (tidy rows,
metrics as fractions), tables as CSV and figures as PNG. Writes go to a temporary
file that is renamed into place, so an interrupted run never leaves half a result.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from . import paths

SCHEMA_VERSION = 1
_UMASK = os.umask(0)  # read the process umask once (os.umask can only read it by setting it)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are for sharing, as with open()
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def git_revision() -> str | None:
    root = paths.checkout_root()
    if root is None:
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: Any = None) -> dict:
    """What produced a result: package, torch and Python versions, device, torch's CPU threads (their
    count changes a CPU result's floating-point sums), git revision."""
    import sys

    from . import __version__

    torch = sys.modules.get("torch")  # never imported just for this record
    env = {
        "backdoorlab": __version__,
        "torch": torch.__version__ if torch is not None else None,
        "python": platform.python_version(),
        "device": str(device) if device is not None else "cpu",
        "cpu_threads": torch.get_num_threads() if torch is not None else None,
        "git": git_revision(),
    }
    if torch is not None and device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def run_dir(notebook: str, setting_id: str) -> Path:
    """The (created) folder of one run: ``runs/<notebook>/<setting_id>``, or ``$BACKDOORLAB_RUN_DIR``
    when set (``backdoorlab sweep`` sets it so each setting writes into its own, initially hidden, folder)."""
    override = os.environ.get("BACKDOORLAB_RUN_DIR")
    folder = Path(override) if override else paths.runs_dir() / notebook / setting_id
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_metrics(
    notebook: str,
    setting_id: str,
    parameters: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    device: Any = None,
) -> Path:
    """Write the run's ``metrics.json`` (the one schema the report reads)."""
    record = {
        "schema": SCHEMA_VERSION,
        "notebook": notebook,
        "setting_id": setting_id,
        "parameters": dict(parameters),
        "environment": environment(device),
        "rows": [dict(r) for r in rows],
    }
    return write_json(run_dir(notebook, setting_id) / "metrics.json", record)


def write_table(frame: Any, path: str | os.PathLike) -> Path:
    """Write a pandas DataFrame as CSV, atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 150) -> Path:
    """Save a matplotlib figure as PNG, atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    return Path(path)
