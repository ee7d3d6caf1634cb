"""The model zoo: a trained model is saved once and reused by every notebook.

An entry is a folder ``runs/zoo/<label>-<key>/`` holding ``model.safetensors`` (the
weights; loading never unpickles) and ``record.json`` (the setting, poison-index hash,
metrics, versions, device). ``<key>`` hashes the setting, so a changed setting is a
new entry. The record is written last: an entry without it is incomplete and is
retrained, never half-read.

Workers that share a zoo (a sweep's processes, Ray tasks on one host or on a shared POSIX
file system) build an entry once: ``lock(label, setting)`` is an exclusive ``flock`` on
``runs/zoo/.locks/<label>-<key>.lock``, held while a worker checks for the entry and
builds it, so a second worker waits and then loads what the first saved.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from . import paths, runs


def key(setting: Mapping[str, Any]) -> str:
    canonical = json.dumps(setting, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def entry_dir(label: str, setting: Mapping[str, Any]) -> Path:
    return paths.zoo_dir() / f"{label}-{key(setting)}"


@contextlib.contextmanager
def lock(label: str, setting: Mapping[str, Any]) -> Iterator[None]:
    """Hold the entry's exclusive lock (blocking) while checking for and building it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        yield
        return
    path = paths.zoo_dir() / ".locks" / f"{label}-{key(setting)}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def exists(label: str, setting: Mapping[str, Any]) -> bool:
    return (entry_dir(label, setting) / "record.json").exists()


def _save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    with runs.atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))


def save(label: str, setting: Mapping[str, Any], model: nn.Module, record: Mapping[str, Any],
         extra: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> dict[str, Any]:
    """Save ``model`` (and named tensor groups in ``extra``, e.g. an attack's trigger
    generator, each as ``<name>.safetensors``), then the record: ``record`` with the setting
    and the environment that trained the model (``runs.environment``). Returns that record."""
    folder = entry_dir(label, setting)
    folder.mkdir(parents=True, exist_ok=True)
    _save_tensors(folder / "model.safetensors", model.state_dict())
    for name, tensors in (extra or {}).items():
        if tensors:
            _save_tensors(folder / f"{name}.safetensors", tensors)
    device = next(model.parameters(), torch.empty(0)).device
    written = {"setting": dict(setting), **record, "environment": runs.environment(device)}
    runs.write_json(folder / "record.json", written)
    return written


def load(label: str, setting: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """Load an entry's weights into ``model`` (shaped like the saved one); returns its record."""
    folder = entry_dir(label, setting)
    record = runs.read_json(folder / "record.json")
    model.load_state_dict(load_tensors(label, setting, "model", str(next(model.parameters()).device)))
    return record


def load_tensors(label: str, setting: Mapping[str, Any], name: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A named tensor group of an entry (empty if it was saved without one)."""
    from safetensors.torch import load_file

    path = entry_dir(label, setting) / f"{name}.safetensors"
    return load_file(str(path), device=device) if path.exists() else {}


def cached_tensors(label: str, setting: Mapping[str, Any], build: Callable[[], Mapping[str, torch.Tensor]],
                   device: Any = "cpu") -> dict[str, torch.Tensor]:
    """Tensors computed once per setting and reused (an attack's pattern, encoder, crafted images)."""
    with lock(label, setting):
        if exists(label, setting):
            return load_tensors(label, setting, "tensors", str(device))
        return _build_tensors(label, setting, build, device)


def _build_tensors(label: str, setting: Mapping[str, Any], build: Callable[[], Mapping[str, torch.Tensor]],
                   device: Any) -> dict[str, torch.Tensor]:
    tensors = {k: v.detach() for k, v in build().items()}
    folder = entry_dir(label, setting)
    folder.mkdir(parents=True, exist_ok=True)
    _save_tensors(folder / "tensors.safetensors", tensors)
    from . import __version__

    runs.write_json(folder / "record.json", {"setting": dict(setting), "version": __version__})
    return {k: v.to(device) for k, v in tensors.items()}


def cached_record(label: str, setting: Mapping[str, Any], build: Callable[[], Mapping[str, Any]]) -> dict[str, Any]:
    """A JSON record computed once per setting and reused (e.g. a detector's scores against
    the ground truth); written atomically, so an interrupted run leaves no half record."""
    with lock(label, setting):
        if exists(label, setting):
            return runs.read_json(entry_dir(label, setting) / "record.json")
        record = {"setting": dict(setting), **build()}
        entry_dir(label, setting).mkdir(parents=True, exist_ok=True)
        runs.write_json(entry_dir(label, setting) / "record.json", record)
        return record


def remove(label: str, setting: Mapping[str, Any]) -> None:
    shutil.rmtree(entry_dir(label, setting), ignore_errors=True)
