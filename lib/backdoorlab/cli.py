"""``backdoorlab`` command line.

    backdoorlab reproduce [--scale default] [NOTEBOOK ...]   run paper notebooks with papermill
    backdoorlab list                                         attacks, defenses, detectors, datasets, models, notebooks
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import paths, scales


def notebook_paths(names: list[str]) -> list[Path]:
    folder = paths.notebooks_dir()
    available = sorted(folder.glob("*.ipynb"))
    if not names:
        return available
    chosen = []
    for name in names:
        path = folder / (name if name.endswith(".ipynb") else f"{name}.ipynb")
        if not path.exists():
            raise SystemExit(f"unknown notebook {name!r}; valid choices: {', '.join(p.stem for p in available)}")
        chosen.append(path)
    return chosen


def reproduce(names: list[str], scale: str, parameters: dict) -> list[Path]:
    """Execute notebooks with papermill; each executed copy is written atomically to
    ``runs/<Notebook>/<Notebook>.<scale>.ipynb`` beside the notebook's own outputs."""
    import papermill as pm

    from .runs import atomic_path

    scales.get(scale)  # fail before any compute
    done = []
    for nb in notebook_paths(names):
        target = paths.runs_dir() / nb.stem / f"{nb.stem}.{scale}.ipynb"
        start = time.perf_counter()
        print(f"[backdoorlab] running {nb.name} at scale {scale!r} ...", flush=True)
        with atomic_path(target) as tmp:
            pm.execute_notebook(str(nb), str(tmp), parameters={"scale": scale, **parameters},
                                kernel_name="python3", progress_bar=False, cwd=str(nb.parent))
        print(f"[backdoorlab] {nb.name}: {time.perf_counter() - start:.0f} s -> {target}", flush=True)
        done.append(target)
    return done


def list_all() -> None:
    from . import attacks, data, defenses, detectors, models

    print("attacks: ", ", ".join(attacks.names()))
    print("defenses:", ", ".join(defenses.names()))
    print("detectors:", ", ".join(detectors.names()))
    print("datasets:", ", ".join(data.names()))
    print("models:  ", ", ".join(models.names()))
    print("scales:  ", ", ".join(scales.SCALES))
    try:
        print("notebooks:", ", ".join(p.stem for p in notebook_paths([])))
    except FileNotFoundError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="backdoorlab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="run paper notebooks with papermill")
    rep.add_argument("notebooks", nargs="*", help="notebook names (default: all)")
    rep.add_argument("--scale", default=scales.default_scale(), help=f"one of {', '.join(scales.SCALES)}")
    rep.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "YAML_VALUE"),
                     help="override a notebook parameter (value parsed as YAML)")
    sub.add_parser("list", help="list attacks, defenses, datasets, models and notebooks")
    args = parser.parse_args(argv)
    if args.command == "reproduce":
        import yaml

        overrides = {k: yaml.safe_load(v) for k, v in args.parameter}
        done = reproduce(args.notebooks, args.scale, overrides)
        print(f"\nOutputs are under {paths.runs_dir()}:")
        for target in done:
            print(f"  {target.parent}/  (executed notebook, and one folder per setting with metrics.json, table.csv, figures)")
        return 0
    list_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
