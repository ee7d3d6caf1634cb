"""``backdoorlab`` command line.

    backdoorlab reproduce [--scale default] [NOTEBOOK ...]   sweep the notebooks' grids/<NB>.<scale>.yaml, then the report
    backdoorlab list                                         attacks, defenses, detectors, datasets, models, notebooks
    backdoorlab sweep NOTEBOOK --grid FILE [--executor local|ray] [--workers N] [--devices 0,1]
                                                             run a notebook over a parameter grid (resumable)
    backdoorlab results [--notebook NB] [--where key=value ...] [--csv FILE | --parquet FILE]
                                                             show or export the results database
    backdoorlab report [--db FILE] [--runs DIR] [--out DIR]  render runs/report/index.html and index.md
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


def reproduce(names: list[str], scale: str, parameters: dict, workers: int | None = None) -> list:
    """Sweep each notebook's ``grids/<Notebook>.<scale>.yaml`` (its own defaults at ``scale`` when
    there is none), with ``parameters`` fixed on top; every grid is validated before anything runs.
    Returns the sweeps' reports; outputs go to ``runs/<Notebook>/<setting-id>/`` and
    ``runs/results.sqlite``."""
    from . import sweep

    scales.get(scale)  # fail before any compute
    overrides = {"scale": scale, **parameters}
    grids = [sweep.load_grid(scale, nb, overrides, fallback_scale=scale) for nb in notebook_paths(names)]
    reports = []
    for grid in grids:
        start = time.perf_counter()
        print(f"[backdoorlab] {grid.notebook}: {len(grid)} setting(s) at scale {scale!r} ...", flush=True)
        report = sweep.sweep(grid, workers=workers)
        print(f"[backdoorlab] {grid.notebook}: {time.perf_counter() - start:.0f} s; {report.summary()}", flush=True)
        reports.append(report)
    return reports


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


def notebook_path(name: str) -> Path:
    """A notebook name in ``notebooks/`` or a path to an ``.ipynb`` file."""
    path = Path(name)
    if path.suffix == ".ipynb" and path.exists():
        return path
    return notebook_paths([name])[0]


def run_sweep(args: argparse.Namespace) -> int:
    from . import sweep

    nb = notebook_path(args.notebook)
    grid = sweep.load_grid(args.grid, nb)  # validated before anything runs
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else []
    print(f"[backdoorlab] sweep {nb.stem}: {len(grid)} settings, {args.executor} executor -> "
          f"{paths.runs_dir() / nb.stem}", flush=True)
    report = sweep.sweep(grid, executor=args.executor, workers=args.workers, devices=devices,
                         ray_address=args.ray_address, gpus_per_task=args.gpus_per_task)
    print(report.summary(), flush=True)
    return 1 if report.failed else 0


def show_results(args: argparse.Namespace) -> int:
    from .results import ResultsDB

    db = ResultsDB()
    filters = {}
    for item in args.where:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--where expects key=value, got {item!r}")
        filters[key] = value
    if args.csv or args.parquet:
        target = db.export(args.csv or args.parquet, args.notebook, **filters)
        print(f"[backdoorlab] wrote {target}")
        return 0
    settings = db.settings(args.notebook)
    if not settings:
        print(f"no results in {db.path}")
        return 0
    failed = [s for s in settings if s["status"] == "failed"]
    print(f"{db.path}: {len(settings) - len(failed)} settings ok, {len(failed)} failed")
    for s in failed:
        last = [line for line in (s["error"] or "").strip().splitlines() if line.strip()][-1:] or [""]
        print(f"  FAILED {s['notebook']}/{s['setting_id']}: {last[0].strip()}")
    frame = db.frame(args.notebook, **filters)
    if frame.empty:
        print("no metric rows match")
        return 0
    # Key columns: those that vary between rows; constant ones are listed once above the table.
    text = frame.astype(str)
    constant = [c for c in frame.columns if c not in ("notebook", "setting_id") and text[c].nunique() == 1 and len(frame) > 1]
    if constant:
        print("same in every row:", ", ".join(f"{c}={text[c].iloc[0]}" for c in constant))
    print(frame.drop(columns=constant).to_string(index=False, max_colwidth=40))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="backdoorlab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("reproduce", help="sweep the paper notebooks' grids at a scale, then render the report")
    rep.add_argument("notebooks", nargs="*", help="notebook names (default: all)")
    rep.add_argument("--scale", default=scales.default_scale(), help=f"one of {', '.join(scales.SCALES)}")
    rep.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "YAML_VALUE"),
                     help="override a notebook parameter (value parsed as YAML)")
    rep.add_argument("--workers", type=int, default=None, help="settings run in parallel processes (default 1)")
    sub.add_parser("list", help="list attacks, defenses, datasets, models and notebooks")
    swp = sub.add_parser("sweep", help="run a notebook over a parameter grid (resumable; results in runs/results.sqlite)")
    swp.add_argument("notebook", help="notebook name in notebooks/ or path to an .ipynb")
    swp.add_argument("--grid", required=True, help="grid YAML file, or a scale name for grids/<NOTEBOOK>.<scale>.yaml")
    swp.add_argument("--executor", default="local", choices=["local", "ray"])
    swp.add_argument("--workers", type=int, default=None,
                     help="parallel settings (local: processes, default 1 or one per device; ray: CPUs of a local instance)")
    swp.add_argument("--devices", default=None, help="local: comma-separated GPU ids, one per worker, round robin")
    swp.add_argument("--ray-address", default=None, help="ray: address of a running cluster (default: a local instance)")
    swp.add_argument("--gpus-per-task", type=float, default=0.0, help="ray: GPUs reserved per setting")
    res = sub.add_parser("results", help="show or export the results database (runs/results.sqlite)")
    res.add_argument("--notebook", default=None, help="only this notebook")
    res.add_argument("--where", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                     help="keep rows whose field or parameter equals the value")
    out = res.add_mutually_exclusive_group()
    out.add_argument("--csv", default=None, help="export to this CSV file")
    out.add_argument("--parquet", default=None, help="export to this Parquet file")
    rp = sub.add_parser("report", help="render runs/report/index.html and index.md from the results database "
                                       "(mean ± std over seeds, figures, paper numbers, executed notebooks)")
    rp.add_argument("--db", type=Path, default=None, help="results database (default: <runs>/results.sqlite)")
    rp.add_argument("--runs", type=Path, default=None, help="runs folder (default: $BACKDOORLAB_RUNS or <checkout>/runs)")
    rp.add_argument("--out", type=Path, default=None, help="output folder (default: <runs>/report)")
    args = parser.parse_args(argv)
    if args.command == "report":
        from . import report

        try:
            index = report.build(args.db, args.runs, args.out)
        except FileNotFoundError as err:
            raise SystemExit(str(err))
        print(f"[backdoorlab] report: {index}\n[backdoorlab] markdown: {index.with_name('index.md')}")
        return 0
    if args.command == "sweep":
        return run_sweep(args)
    if args.command == "results":
        return show_results(args)
    if args.command == "reproduce":
        import yaml

        overrides = {k: yaml.safe_load(v) for k, v in args.parameter}
        reports = reproduce(args.notebooks, args.scale, overrides, args.workers)
        from . import report

        index = report.build()
        print(f"\nRun folders: {paths.runs_dir()}/<Notebook>/<setting-id>/ (executed notebook, metrics.json, tables, figures)")
        print(f"Results database: {paths.runs_dir() / 'results.sqlite'}\nReport: {index}")
        return 1 if any(r.failed for r in reports) else 0
    list_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
