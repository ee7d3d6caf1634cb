"""The rendered report: ``runs/report/index.html`` and ``index.md`` from the results database.

Only the database (``results.ResultsDB``) and the run folders it names are read: no model
is loaded, nothing is trained and torch is never imported, so the report can be rebuilt
at any time, also while a sweep is still writing. Per notebook (paper) it shows its
settings (ok / failed, with the error), one table per kind of metric row with
``mean ± std (n)`` over seeds, a seaborn figure per table, the paper's own numbers beside
ours where ``PAPER_TABLES`` knows them (labelled with the paper's setting, never as ours),
and links to the executed notebooks converted to HTML (converted again only when the
``.ipynb`` is newer). The page is one self-contained file (inline CSS, no JavaScript);
every write is atomic and every string from the database is HTML-escaped.
"""
from __future__ import annotations

import hashlib
import html
import json
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import quote

import pandas as pd
from pandas.api.types import is_numeric_dtype

from . import papers, paths
from .results import ResultsDB
from .runs import save_figure, write_text

IGNORED = frozenset({"notebook", "setting_id", "seed", "device"})  # neither key nor metric
# Numeric row fields that name a condition (grouped by), not a measurement (averaged).
NUMERIC_KEYS = frozenset({"clean_samples", "per_class", "n_ratio", "t", "queries", "observation", "poison_num",
                          "clean_num", "epochs", "eps", "alpha", "triggered_samples", "poisoned"})
KEY_ORDER = ("table", "attack", "defense")  # shown first when present
FIGURE_SKIP = frozenset({"seconds"})  # metrics left out of figures (still in the tables)
MAX_FIGURE_METRICS = 6
MAX_BARS = 240  # x levels times hue levels; larger tables get no figure
FIGURE_VERSION = 1  # part of a figure's file name: bump when metric_figure draws differently


def _karim2024() -> tuple[pd.DataFrame, str]:
    return pd.DataFrame(papers.karim2024_rows()).drop(columns="source"), papers.KARIM2024_SETTING


# notebook -> function returning (tidy frame, caption): string columns are keys matched against
# our rows, numeric columns are metrics as fractions (shown in percent), caption names the setting.
PAPER_TABLES: dict[str, Callable[[], tuple[pd.DataFrame, str]]] = {"Karim2024Augmented": _karim2024}


@dataclass
class Table:
    header: list[str]
    rows: list[list[Any]] = field(default_factory=list)  # cells: str or (text, href)


# ---------------------------------------------------------------------------------------- data


@dataclass
class NotebookRows:
    frame: pd.DataFrame  # one row per metric row, with the setting's parameters and ``_fields``
    params: list[str]  # parameter columns
    nested: set[str]  # parameter columns holding JSON-encoded lists or dicts


def load_rows(db: ResultsDB) -> dict[str, NotebookRows]:
    """Per notebook: one pandas row per metric row of its ``ok`` settings (as ``ResultsDB.frame``:
    parameters, prefixed ``param.`` when a row field has the same name, then the row's fields)
    plus ``_fields``, the row's own field names (its kind). Lists and dicts in parameters become
    JSON strings; row fields holding lists or dicts (diagnostics) are left out."""
    parsed = db.metric_rows()
    fields: dict[str, set[str]] = {}
    dropped: dict[str, set[str]] = {}
    for nb, _, _, row in parsed:
        fields.setdefault(nb, set()).update(row)
        dropped.setdefault(nb, set()).update(k for k, v in row.items() if isinstance(v, (dict, list)))
    records: dict[str, list[dict]] = {}
    out: dict[str, NotebookRows] = {}
    for nb, sid, parameters, row in parsed:
        # prefixed when any row of the notebook has the name, so a parameter always lands in one column
        setting = {(f"param.{k}" if k in fields[nb] else k): v for k, v in parameters.items()}
        rows = out.setdefault(nb, NotebookRows(pd.DataFrame(), [], set()))
        rows.params += [k for k in setting if k not in rows.params]
        rows.nested.update(k for k, v in setting.items() if isinstance(v, (dict, list)))
        records.setdefault(nb, []).append({
            "notebook": nb, "setting_id": sid, **{k: _scalar(v) for k, v in setting.items()},
            **{k: v for k, v in row.items() if k not in dropped[nb]},
            "_fields": tuple(k for k in row if k not in dropped[nb])})
    for nb, rows in out.items():
        rows.frame = pd.DataFrame.from_records(records[nb])
    return out


def _scalar(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


def classify(frame: pd.DataFrame, fields: Sequence[str], params: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(keys, metrics)`` for rows with these fields: metrics are the numeric fields (not in
    ``NUMERIC_KEYS``); keys are the other fields and the parameters, never seed/setting_id/device."""
    fields = [f for f in fields if f in frame and f not in IGNORED]
    metrics = [f for f in fields if f not in NUMERIC_KEYS and is_numeric_dtype(frame[f])]
    row_keys = [f for f in fields if f not in metrics]
    row_keys = [k for k in KEY_ORDER if k in row_keys] + [k for k in row_keys if k not in KEY_ORDER]
    param_keys = [p for p in params if p in frame and p.removeprefix("param.") not in IGNORED]
    return list(dict.fromkeys(param_keys + row_keys)), metrics


def summarize(frame: pd.DataFrame, keys: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """Per group of ``keys`` (in order of first appearance, missing values kept as a group):
    ``<metric>.mean``, ``<metric>.std`` (sample std, ddof 1) and ``<metric>.count`` (non-missing)."""
    keys, metrics = list(keys), list(metrics)
    data = frame[keys + metrics].astype({m: float for m in metrics})
    if not keys:
        data, keys = data.assign(_all=""), ["_all"]
    stats = data.groupby(keys, dropna=False, sort=False)[metrics].agg(["mean", "std", "count"])
    stats.columns = [f"{m}.{s}" for m, s in stats.columns]
    return stats.reset_index().drop(columns="_all", errors="ignore")


def varying(frame: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """The keys with more than one value (missing counts as a value)."""
    return [k for k in keys if frame[k].nunique(dropna=False) > 1]


def mean_std(mean: float, std: float, count: int, scale: float = 1.0, digits: int | None = None) -> str:
    """``mean ± std (n)``; ``mean (1)`` for one value, ``—`` for none."""
    if not count:
        return "—"
    if count == 1 or math.isnan(std):
        return f"{_num(mean * scale, digits)} ({int(count)})"
    return f"{_num(mean * scale, digits)} ± {_num(std * scale, digits)} ({int(count)})"


def _num(x: float, digits: int | None = None) -> str:
    if digits is None:
        digits = 3 if abs(x) < 100 else 1
    return f"{x:.{digits}f}"


def key_text(value: Any) -> str:
    """A key value for display: ``—`` when missing, whole floats without ``.0``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def error_summary(error: str | None) -> str:
    """One line of a traceback: its last ``SomethingError: message`` line, else its first line."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", error or "").splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b", line)]
    return (raised[-1] if raised else lines[0] if lines else "(no error recorded)")[:400]


# -------------------------------------------------------------------------------------- figures


def metric_figure(frame: pd.DataFrame, keys: Sequence[str], metrics: Sequence[str], title: str = ""):
    """Bars of each metric (one panel each) by ``attack`` (else the first key), coloured by the
    other keys; error bars are the standard deviation over the rows of a bar (its seeds).
    Works on any tidy frame; returns the figure, or None when there is nothing sensible to plot."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    metrics = [m for m in metrics if m not in FIGURE_SKIP and frame[m].notna().any()][:MAX_FIGURE_METRICS]
    if not metrics:
        return None
    keys = list(keys)
    x = next((k for k in KEY_ORDER[1:] if k in keys), keys[0] if keys else "metric")
    others = [k for k in keys if k != x]
    data = frame[keys + metrics].astype({m: float for m in metrics})
    if x in keys:
        data[x] = data[x].map(key_text)
    else:
        data[x] = ""
    hue = " / ".join(others) or None
    if hue:
        data[hue] = data[others].map(key_text).agg(" / ".join, axis=1)
    long = data.melt(id_vars=[x] + ([hue] if hue else []), value_vars=metrics, var_name="panel", value_name="value")
    long = long.dropna(subset=["value"])
    n_x, n_hue = long[x].nunique(), long[hue].nunique() if hue else 1
    if n_x * n_hue > MAX_BARS or n_x * n_hue == 1:  # unreadable, or a single bar per panel
        return None
    with warnings.catch_warnings():  # seaborn's tight_layout complains about long legends
        warnings.simplefilter("ignore", UserWarning)
        aspect = min(2.5, max(1.2, n_x * n_hue / 10))
        grid = sns.catplot(long, kind="bar", x=x, y="value", hue=hue, col="panel", sharey=False, errorbar="sd",
                           col_wrap=min(3 if aspect < 1.8 else 2, len(metrics)), height=2.8, aspect=aspect,
                           palette="tab20" if n_hue > 10 else None)
    grid.set_titles("{col_name}")
    grid.set_axis_labels(x, "")
    for ax in grid.axes.flat:
        ax.tick_params(axis="x", labelrotation=45 if n_x > 4 else 0)
    if title:
        grid.figure.suptitle(title, y=1.03)
    plt.close(grid.figure)
    return grid.figure


# ------------------------------------------------------------------------------------ notebooks


@lru_cache(maxsize=1)
def _exporter():
    from nbconvert import HTMLExporter

    return HTMLExporter()


def convert_notebook(ipynb: Path, target: Path) -> Path:
    """``ipynb`` as HTML at ``target`` (nbconvert), unless ``target`` is already newer."""
    if target.exists() and target.stat().st_mtime >= ipynb.stat().st_mtime:
        return target
    body, _ = _exporter().from_filename(str(ipynb))
    return write_text(target, body)


def _safe(name: str) -> str:
    """A file or anchor name from a string of the database."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(name)).lstrip(".") or "_"


def _run_folder(setting: dict, runs_dir: Path) -> Path:
    if not setting.get("run_dir"):
        return runs_dir / setting["notebook"] / setting["setting_id"]
    folder = Path(setting["run_dir"])
    return folder if folder.is_absolute() or folder.exists() else runs_dir / folder


def _link(target: Path, out_dir: Path) -> str:
    return Path(os.path.relpath(target, out_dir)).as_posix()


# --------------------------------------------------------------------------------------- blocks
# A page is a list of blocks, rendered once as HTML and once as Markdown:
# ("h2", (text, anchor)), ("h3", text), ("p", text), ("note", text), ("table", Table),
# ("img", (src, alt)), ("details", (summary, text)).


def _notebook_blocks(name: str, settings: list[dict], rows: NotebookRows | None,
                     runs_dir: Path, out_dir: Path, figures: set[Path]) -> list[tuple[str, Any]]:
    ok = [s for s in settings if s["status"] == "ok"]
    failed = [s for s in settings if s["status"] != "ok"]
    blocks: list[tuple[str, Any]] = [("h2", (name, f"nb-{_safe(name)}")),
                                     ("p", f"{len(ok)} ok, {len(failed)} failed setting(s).")]
    blocks += _settings_blocks(name, settings, runs_dir, out_dir)
    if rows is None:
        return blocks + [("note", "No metric rows recorded for this notebook.")]
    frame, params = rows.frame, rows.params
    paper = PAPER_TABLES[name]() if name in PAPER_TABLES else None
    compared = False
    k = 0
    for fields in dict.fromkeys(frame["_fields"]):  # one table per kind of row, in order of appearance
        part = frame[frame["_fields"] == fields].infer_objects()
        keys, metrics = classify(part, fields, params)
        if not metrics:
            continue
        k += 1
        stats = summarize(part, keys, metrics)
        shown = _displayed(part, varying(part, keys), rows.nested)
        fixed = [f"{key} = {key_text(part[key].iloc[0])}" for key in keys if key not in shown and key not in params]
        title = f"Table {k}: {', '.join(metrics)}" + (f" by {', '.join(shown)}" if shown else "")
        blocks += [("h3", title), ("table", _stats_table(stats, shown, metrics)),
                   ("note", "mean ± std (n) over seeds; n counts the rows averaged."
                    + (f" All rows: {'; '.join(fixed)}." if fixed else ""))]
        path = _figure(part, shown, metrics, f"{name}, table {k}", out_dir / "figures" / f"{_safe(name)}-{k}")
        if path is not None:
            figures.add(path)
            blocks.append(("img", (_link(path, out_dir), f"{name} table {k}")))
        if paper is not None and not compared:
            table = _paper_table(stats, keys, shown, metrics, paper[0])
            if table is not None:
                compared = True
                blocks += [("h3", f"Paper numbers beside ours (table {k})"),
                           ("note", f"Paper: {paper[1]}. Ours ({_ours(part)}): mean ± std (n) over seeds, "
                                    "in percent. The settings differ; the paper's numbers are not ours."),
                           ("table", table)]
    return blocks


def _displayed(frame: pd.DataFrame, keys: list[str], nested: set[str]) -> list[str]:
    """The keys to show: list- or dict-valued parameters only when the other keys do not already
    tell the groups apart (e.g. a smoke setting's shorter attack list)."""
    rest = [k for k in keys if k not in nested]
    if len(rest) == len(keys):
        return keys

    def groups(cols: list[str]) -> int:
        return frame.groupby(cols, dropna=False).ngroups if cols else 1
    return rest if groups(rest) == groups(keys) else keys


def _ours(frame: pd.DataFrame) -> str:
    """Our setting in a few words: the dataset, model and poison rate when the rows share them."""
    common = [f"{c}={key_text(frame[c].iloc[0])}" for c in ("dataset", "model", "pratio")
              if c in frame and frame[c].nunique(dropna=False) == 1]
    return ", ".join(common) or "this notebook's settings"


def _figure(frame: pd.DataFrame, keys: list[str], metrics: list[str], title: str, stem: Path) -> Path | None:
    """``metric_figure`` saved as ``<stem>-<hash of its data>.png``; an existing file is reused
    (a rebuild with unchanged results draws nothing), None when there is no figure."""
    data = frame[keys + metrics].to_json(orient="split", index=False, default_handler=str)
    digest = hashlib.sha1(json.dumps([data, keys, metrics, title, FIGURE_VERSION]).encode()).hexdigest()[:12]
    path = stem.with_name(f"{stem.name}-{digest}.png")
    if path.exists():
        return path
    fig = metric_figure(frame, keys, metrics, title=title)
    return None if fig is None else save_figure(fig, path, dpi=110)


def _settings_blocks(name: str, settings: list[dict], runs_dir: Path, out_dir: Path) -> list[tuple[str, Any]]:
    frame = pd.DataFrame([{k: _scalar(v) for k, v in s["parameters"].items()} for s in settings])
    shown = [c for c in frame.columns if c == "seed" or frame[c].nunique(dropna=False) > 1]
    table = Table(["setting", "status", *shown, "seconds", "notebook", "folder", "error"])
    details, missing = [], []
    for i, s in enumerate(settings):
        folder = _run_folder(s, runs_dir)
        # the sweep keeps a failed setting's executed notebook in runs/<Notebook>/.failed/
        ipynb = next((p for p in (folder / f"{name}.ipynb", runs_dir / name / ".failed" / f"{s['setting_id']}.ipynb")
                      if p.is_file()), None)
        if ipynb is not None:
            try:
                page = convert_notebook(ipynb, out_dir / "notebooks" / _safe(name) / f"{_safe(s['setting_id'])}.html")
                notebook: Any = ("html", _link(page, out_dir))
            except Exception as err:  # a broken notebook file must not stop the report
                notebook = f"conversion failed: {type(err).__name__}"
        else:
            notebook = "missing"
            missing.append(s["setting_id"])
        seconds = "—" if s["seconds"] is None else f"{s['seconds']:.0f}"
        error = error_summary(s["error"]) if s["status"] != "ok" else ""
        table.rows.append([s["setting_id"], s["status"], *(key_text(frame[c].iloc[i]) for c in shown), seconds,
                           notebook, ("folder", _link(folder, out_dir)) if folder.is_dir() else "—", error])
        if s["status"] != "ok":
            details.append(("details", (f"{s['setting_id']}: {error}", s["error"] or "")))
    blocks: list[tuple[str, Any]] = [("h3", "Settings"), ("table", table), *details]
    if missing:
        blocks.append(("note", f"No executed notebook file for: {', '.join(missing)} (skipped)."))
    common = [(c, key_text(frame[c].iloc[0])) for c in frame.columns if c not in shown]
    if common:
        blocks += [("h3", "Common parameters"), ("table", Table(["parameter", "value"], [list(p) for p in common]))]
    return blocks


def _stats_table(stats: pd.DataFrame, keys: Sequence[str], metrics: Sequence[str]) -> Table:
    table = Table([*keys, *metrics])
    for _, r in stats.iterrows():
        table.rows.append([*(key_text(r[k]) for k in keys),
                           *(mean_std(r[f"{m}.mean"], r[f"{m}.std"], r[f"{m}.count"]) for m in metrics)])
    return table


def _paper_table(stats: pd.DataFrame, keys: Sequence[str], shown: Sequence[str], metrics: Sequence[str],
                 paper: pd.DataFrame) -> Table | None:
    """Our stats beside the paper's numbers (percent) on the paper's keys; None when they do not fit."""
    paper_keys = [c for c in paper.columns if not is_numeric_dtype(paper[c])]
    paper_metrics = [c for c in paper.columns if is_numeric_dtype(paper[c]) and c in metrics]
    if not paper_metrics or not set(paper_keys) <= set(keys):
        return None
    merged = stats.merge(paper[paper_keys + paper_metrics].rename(columns={m: f"{m}.paper" for m in paper_metrics}),
                         on=paper_keys, how="inner")
    if merged.empty:
        return None
    cols = list(dict.fromkeys([*paper_keys, *shown]))
    table = Table([*cols, *(f"{m.upper()} {who} (%)" for m in paper_metrics for who in ("ours", "paper"))])
    for _, r in merged.iterrows():
        cells = []
        for m in paper_metrics:
            cells += [mean_std(r[f"{m}.mean"], r[f"{m}.std"], r[f"{m}.count"], scale=100, digits=2),
                      f"{r[f'{m}.paper'] * 100:.2f}"]
        table.rows.append([*(key_text(r[c]) for c in cols), *cells])
    return table


def _overview_blocks(notebooks: list[str], settings: list[dict], built: str, db_path: Path,
                     runs_dir: Path) -> list[tuple[str, Any]]:
    counts = Table(["notebook", "ok", "failed"])
    failures = Table(["notebook", "setting", "error"])
    for nb in notebooks:
        mine = [s for s in settings if s["notebook"] == nb]
        counts.rows.append([(nb, f"#nb-{_safe(nb)}"), str(sum(s["status"] == "ok" for s in mine)),
                            str(sum(s["status"] != "ok" for s in mine))])
        failures.rows += [[nb, s["setting_id"], error_summary(s["error"])] for s in mine if s["status"] != "ok"]
    blocks = [("p", f"Built {built}. Database: {db_path}. Run folders: {runs_dir}."), ("h3", "Settings per notebook"),
              ("table", counts)]
    if failures.rows:
        blocks += [("h3", "Failed settings"), ("table", failures)]
    return blocks


# ------------------------------------------------------------------------------------ rendering

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5em auto;max-width:1400px;
padding:0 1em;color:#222;line-height:1.4}
h2{border-bottom:2px solid #ddd;margin-top:2em}
table{border-collapse:collapse;margin:.4em 0 .8em;font-size:.82em}
th,td{border:1px solid #ccc;padding:.15em .5em;text-align:left;vertical-align:top;font-variant-numeric:tabular-nums}
th{background:#eef1f5} tr:nth-child(even) td{background:#f8f8f8}
img{max-width:100%;border:1px solid #eee}
pre{background:#f6f6f6;padding:.5em;overflow-x:auto;font-size:.78em}
.note{color:#555;font-size:.85em}
summary{cursor:pointer;color:#a00}"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _href(link: str) -> str:
    return _e(link if link.startswith("#") else quote(link))


def _html_cell(cell: Any) -> str:
    return f'<a href="{_href(cell[1])}">{_e(cell[0])}</a>' if isinstance(cell, tuple) else _e(cell)


def render_html(title: str, blocks: list[tuple[str, Any]]) -> str:
    out = ['<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
           f"<title>{_e(title)}</title><style>{CSS}</style></head><body>", f"<h1>{_e(title)}</h1>"]
    for kind, value in blocks:
        if kind == "h2":
            out.append(f'<h2 id="{_e(value[1])}">{_e(value[0])}</h2>')
        elif kind == "h3":
            out.append(f"<h3>{_e(value)}</h3>")
        elif kind in ("p", "note"):
            out.append(f'<p class="{kind}">{_e(value)}</p>')
        elif kind == "table":
            head = "".join(f"<th>{_e(h)}</th>" for h in value.header)
            body = "\n".join("<tr>" + "".join(f"<td>{_html_cell(c)}</td>" for c in row) + "</tr>"
                             for row in value.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>")
        elif kind == "img":
            out.append(f'<p><img src="{_href(value[0])}" alt="{_e(value[1])}"></p>')
        elif kind == "details":
            out.append(f"<details><summary>{_e(value[0])}</summary><pre>{_e(value[1])}</pre></details>")
    return "\n".join(out) + "\n</body></html>\n"


def _md(text: Any) -> str:
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")


def _md_cell(cell: Any) -> str:
    return f"[{_md(cell[0])}]({_href(cell[1])})" if isinstance(cell, tuple) else _md(cell)


def render_markdown(title: str, blocks: list[tuple[str, Any]]) -> str:
    out = [f"# {_md(title)}"]
    for kind, value in blocks:
        if kind == "h2":
            out.append(f'<a id="{_e(value[1])}"></a>\n\n## {_md(value[0])}')
        elif kind == "h3":
            out.append(f"### {_md(value)}")
        elif kind == "p":
            out.append(_md(value))
        elif kind == "note":
            out.append(f"*{_md(value)}*")
        elif kind == "table":
            lines = ["| " + " | ".join(_md(h) for h in value.header) + " |",
                     "|" + "---|" * len(value.header)]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in value.rows]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{_md(value[1])}]({_href(value[0])})")
        elif kind == "details":
            out.append(f"<details><summary>{_e(value[0])}</summary><pre>{_e(value[1])}</pre></details>")
    return "\n\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------- build


def build(db_path: str | Path | None = None, runs_dir: str | Path | None = None,
          out_dir: str | Path | None = None) -> Path:
    """Render ``<out_dir>/index.html`` and ``index.md`` (figures under ``figures/``, notebooks under
    ``notebooks/``) from the database; defaults: ``runs/``, ``runs/results.sqlite``, ``runs/report``.
    Returns the path of ``index.html``."""
    runs_dir = Path(runs_dir) if runs_dir is not None else paths.runs_dir()
    db_path = Path(db_path) if db_path is not None else runs_dir / "results.sqlite"
    out_dir = Path(out_dir) if out_dir is not None else runs_dir / "report"
    if not db_path.is_file():
        raise FileNotFoundError(f"no results database at {db_path}; run the sweep first or pass db_path")
    db = ResultsDB(db_path)
    settings = db.settings()
    rows = load_rows(db)
    notebooks = sorted({s["notebook"] for s in settings} | set(rows))
    built = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    figures: set[Path] = set()
    blocks = _overview_blocks(notebooks, settings, built, db_path, runs_dir)
    for nb in notebooks:
        mine = sorted((s for s in settings if s["notebook"] == nb), key=lambda s: s["setting_id"])
        blocks += _notebook_blocks(nb, mine, rows.get(nb), runs_dir, out_dir, figures)
    for stale in (out_dir / "figures").glob("*.png"):
        if stale not in figures:
            stale.unlink()
    write_text(out_dir / "index.md", render_markdown("backdoorlab report", blocks))
    return write_text(out_dir / "index.html", render_html("backdoorlab report", blocks))


__all__ = ["PAPER_TABLES", "build", "classify", "summarize", "metric_figure", "mean_std", "error_summary"]
