"""The model zoo: a trained model is saved once and reused by every notebook.

An entry is a folder ``runs/zoo/<label>-<key>/`` holding ``model.safetensors`` (the
weights; loading never unpickles) and ``record.json`` (the setting, poison-index hash,
metrics, versions, device). ``<key>`` hashes the setting, so a changed setting is a
new entry. The record is written last: an entry without it is incomplete and is
retrained, never half-read.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from . import paths, runs


def key(setting: Mapping[str, Any]) -> str:
    canonical = json.dumps(setting, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def entry_dir(label: str, setting: Mapping[str, Any]) -> Path:
    return paths.zoo_dir() / f"{label}-{key(setting)}"


def exists(label: str, setting: Mapping[str, Any]) -> bool:
    return (entry_dir(label, setting) / "record.json").exists()


def save(label: str, setting: Mapping[str, Any], model: nn.Module, record: Mapping[str, Any]) -> Path:
    from safetensors.torch import save_file

    folder = entry_dir(label, setting)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with runs.atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    runs.write_json(folder / "record.json", {"setting": dict(setting), **record})
    return folder


def load(label: str, setting: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """Load an entry's weights into ``model`` (shaped like the saved one); returns its record."""
    from safetensors.torch import load_file

    folder = entry_dir(label, setting)
    record = runs.read_json(folder / "record.json")
    state = load_file(str(folder / "model.safetensors"), device=str(next(model.parameters()).device))
    model.load_state_dict(state)
    return record


def remove(label: str, setting: Mapping[str, Any]) -> None:
    shutil.rmtree(entry_dir(label, setting), ignore_errors=True)
