"""Parameter grids for notebook sweeps: loading, validation against the notebook's
parameters cell, expansion into settings with deterministic ids.

A grid file (``grids/<Notebook>.<scale>.yaml``)::

    notebook: Wu2022BackdoorBench   # optional; must match the notebook swept
    fixed:                          # parameter -> one value
      scale: default
    cross:                          # parameter -> list of values; settings are their Cartesian product
      attacks: [[badnets], [blended]]
      seed: [0, 1]

Names and value types are checked against the typed assignments of the notebook's
``parameters`` cell (``papermill.inspect_notebook``) before anything runs.
"""
from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .. import paths

GRID_KEYS = ("notebook", "fixed", "cross")

# Declared type name (as papermill infers it) -> accepted Python types. Other annotations
# (none, Optional[...], tuple, ...) are not checked.
_TYPES: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "float": (float, int), "bool": (bool,),
                                       "list": (list,), "dict": (dict,)}


@dataclass(frozen=True)
class GridSetting:
    """One point of a grid: its id (the run folder's name) and the notebook parameters."""

    setting_id: str
    parameters: dict[str, Any]


@dataclass
class Grid:
    """A validated grid for one notebook."""

    notebook: str  # notebook name (file stem), e.g. "Wu2022BackdoorBench"
    notebook_path: Path
    fixed: dict[str, Any] = field(default_factory=dict)
    cross: dict[str, list] = field(default_factory=dict)

    def settings(self) -> list[GridSetting]:
        """The Cartesian product of ``cross`` (in file order), each merged with ``fixed``."""
        names = list(self.cross)
        out = []
        for values in itertools.product(*(self.cross[n] for n in names)):
            crossed = dict(zip(names, values))
            params = {**self.fixed, **crossed}
            out.append(GridSetting(setting_id(params, names), params))
        return out

    def __len__(self) -> int:
        return math.prod(len(v) for v in self.cross.values())


def notebook_parameters(notebook_path: str | Path) -> dict[str, str]:
    """The notebook's parameters and their declared type names (``"None"`` when untyped)."""
    import papermill as pm

    found = pm.inspect_notebook(str(notebook_path))
    if not found:
        raise ValueError(f"{notebook_path} has no cell tagged 'parameters' with parameters to sweep")
    return {name: info.get("inferred_type_name") or "None" for name, info in found.items()}


def check_value(name: str, value: Any, type_name: str) -> Any:
    """``value`` if it fits the declared type (a float parameter also takes ints and strings
    such as ``"1e-3"``, which PyYAML reads as strings), converted; else a ValueError."""
    if type_name == "float" and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    accepted = _TYPES.get(type_name)
    if accepted is None:
        return value
    if isinstance(value, bool) and bool not in accepted:  # bool is an int subclass
        accepted = ()
    if not isinstance(value, accepted):
        raise ValueError(f"parameter {name!r} is declared {type_name}, got {type(value).__name__} {value!r}")
    return float(value) if type_name == "float" else value


def setting_id(parameters: Mapping[str, Any], crossed: list[str] | tuple[str, ...] = ()) -> str:
    """``<name=value_...>-<hash8>``: readable from the crossed values, unique by a hash of all
    parameters (sorted JSON), safe as a folder name."""
    digest = hashlib.sha256(json.dumps(dict(parameters), sort_keys=True, separators=(",", ":"),
                                       default=str).encode()).hexdigest()[:8]
    readable = "_".join(f"{name}={_short(parameters[name])}" for name in crossed)
    readable = re.sub(r"[^A-Za-z0-9.+=,_-]+", "~", readable)[:80].strip("~") or "setting"
    return f"{readable}-{digest}"


def _short(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(_short(v) for v in value) or "none"
    if isinstance(value, dict):
        return "+".join(f"{k}~{_short(v)}" for k, v in sorted(value.items())) or "none"
    return str(value)


def parse_grid(spec: Mapping[str, Any] | None, notebook_path: str | Path, source: str = "grid") -> Grid:
    """Validate a grid mapping against the notebook's parameters; every problem is reported at once."""
    notebook_path = Path(notebook_path)
    notebook = notebook_path.stem
    spec = {} if spec is None else spec
    if not isinstance(spec, Mapping):
        raise ValueError(f"{source}: expected a mapping with keys {', '.join(GRID_KEYS)}, got {type(spec).__name__}")
    declared = notebook_parameters(notebook_path)
    errors = []
    unknown_keys = sorted(set(spec) - set(GRID_KEYS))
    if unknown_keys:
        errors.append(f"unknown key(s) {', '.join(map(repr, unknown_keys))}; valid keys: {', '.join(GRID_KEYS)}")
    if spec.get("notebook") not in (None, notebook):
        errors.append(f"grid is for notebook {spec['notebook']!r}, not {notebook!r}")
    fixed, cross = spec.get("fixed") or {}, spec.get("cross") or {}
    for key, part in (("fixed", fixed), ("cross", cross)):
        if not isinstance(part, Mapping):
            errors.append(f"{key!r} must map parameter names to values, got {type(part).__name__}")
            raise ValueError(f"{source} is invalid:\n  - " + "\n  - ".join(errors))

    def checked(name: str, value: Any) -> Any:
        try:
            return check_value(name, value, declared[name])
        except ValueError as err:
            errors.append(str(err))
            return value

    for name in [*fixed, *cross]:
        if name not in declared:
            close = difflib.get_close_matches(str(name), list(declared), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"unknown parameter {name!r}{hint}; valid parameters of {notebook}: {', '.join(declared)}")
    for name in sorted(set(fixed) & set(cross)):
        errors.append(f"parameter {name!r} is both fixed and crossed")
    good_fixed = {n: checked(n, v) for n, v in fixed.items() if n in declared}
    good_cross = {}
    for name, values in cross.items():
        if not isinstance(values, list) or not values:
            errors.append(f"cross parameter {name!r} needs a non-empty list of values, got {values!r}")
        elif name in declared:
            values = [checked(name, v) for v in values]
            keys = [json.dumps(v, sort_keys=True, default=str) for v in values]
            if len(set(keys)) < len(keys):
                errors.append(f"cross parameter {name!r} repeats a value: {values!r}")
            good_cross[name] = values
    if "scale" in declared:  # an unknown scale fails here, not minutes into a run
        from .. import scales

        for value in [*([good_fixed["scale"]] if "scale" in good_fixed else []), *good_cross.get("scale", [])]:
            try:
                scales.get(value)
            except ValueError as err:
                errors.append(str(err))
    if errors:
        raise ValueError(f"{source} is invalid:\n  - " + "\n  - ".join(errors))
    return Grid(notebook, notebook_path, good_fixed, good_cross)


def grid_file(grid: str | Path, notebook: str) -> Path:
    """``grid`` as a path, or a scale name looked up as ``grids/<notebook>.<scale>.yaml``."""
    path = Path(grid)
    if path.exists():
        return path
    root = paths.checkout_root()
    folder = root / "grids" if root is not None else None
    if folder is not None and path.name == str(grid) and (folder / f"{notebook}.{grid}.yaml").exists():
        return folder / f"{notebook}.{grid}.yaml"
    available = sorted(p.name for p in folder.glob(f"{notebook}.*.yaml")) if folder is not None and folder.is_dir() else []
    raise ValueError(f"grid file {str(grid)!r} not found; grids for {notebook}: {', '.join(available) or 'none'}")


def load_grid(grid: str | Path, notebook_path: str | Path, overrides: Mapping[str, Any] | None = None,
              fallback_scale: str | None = None) -> Grid:
    """Read and validate a YAML grid file for the notebook at ``notebook_path``.

    ``overrides`` (e.g. ``-p name value`` on the command line) become fixed values and replace a
    crossed parameter of the same name. With ``fallback_scale``, a missing scale grid file is the
    one-setting grid ``{fixed: {scale: <scale>}}`` (the notebook's own defaults)."""
    import yaml

    try:
        path = grid_file(grid, Path(notebook_path).stem)
    except ValueError:
        if fallback_scale is None:
            raise
        path, spec = None, {"fixed": {"scale": fallback_scale}}
    else:
        try:
            spec = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"grid {path} is not valid YAML: {err}") from err
    if overrides and isinstance(spec, Mapping):
        spec = dict(spec)
        spec["fixed"] = {**(spec.get("fixed") or {}), **overrides}
        spec["cross"] = {k: v for k, v in (spec.get("cross") or {}).items() if k not in overrides}
    return parse_grid(spec, notebook_path, source=f"grid {path or grid}")
