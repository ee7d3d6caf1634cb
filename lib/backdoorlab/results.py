"""The results database: every completed (or failed) notebook setting in one SQLite file.

``runs/results.sqlite`` holds one row per ``(notebook, setting_id)`` in the ``settings``
table (parameters, status, seconds, run folder, traceback of a failure) and the tidy
metric rows of its ``metrics.json`` in ``rows`` (one JSON object per row). The file is in
WAL mode and every write is one ``BEGIN IMMEDIATE`` transaction that replaces the
setting's rows, so concurrent writers (sweep workers, Ray tasks on one host) never lose
or duplicate a row, and recording a setting twice leaves it once.

Only JSON goes in: nothing is ever unpickled.
"""
from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from . import paths

STATUSES = ("ok", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (
    notebook    TEXT NOT NULL,
    setting_id  TEXT NOT NULL,
    status      TEXT NOT NULL,
    parameters  TEXT NOT NULL,
    seconds     REAL,
    run_dir     TEXT,
    error       TEXT,
    finished_at REAL NOT NULL,
    PRIMARY KEY (notebook, setting_id)
);
CREATE TABLE IF NOT EXISTS rows (
    notebook   TEXT NOT NULL,
    setting_id TEXT NOT NULL,
    idx        INTEGER NOT NULL,
    data       TEXT NOT NULL,
    PRIMARY KEY (notebook, setting_id, idx)
);
"""


def default_path() -> Path:
    return paths.runs_dir() / "results.sqlite"


class ResultsDB:
    """``ResultsDB()`` opens (creating if needed) ``runs/results.sqlite``."""

    def __init__(self, path: str | Path | None = None, timeout: float = 60.0):
        self.path = Path(path) if path is not None else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        try:
            con.execute(f"PRAGMA busy_timeout={int(self.timeout * 1000)}")
            yield con
        finally:
            con.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as con:
            for attempt in range(50):  # BEGIN IMMEDIATE can still report "locked" under contention
                try:
                    con.execute("BEGIN IMMEDIATE")
                    break
                except sqlite3.OperationalError as err:
                    if "locked" not in str(err) or attempt == 49:
                        raise
                    time.sleep(0.05 * (attempt + 1))
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    def record(self, notebook: str, setting_id: str, parameters: Mapping[str, Any], *, status: str = "ok",
               rows: Sequence[Mapping[str, Any]] = (), seconds: float | None = None,
               run_dir: str | Path | None = None, error: str | None = None) -> None:
        """Insert or replace one setting and its metric rows, atomically."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}; valid choices: {', '.join(STATUSES)}")
        params = json.dumps(dict(parameters), sort_keys=True, default=str)
        with self._write() as con:
            con.execute("DELETE FROM rows WHERE notebook=? AND setting_id=?", (notebook, setting_id))
            con.execute("INSERT OR REPLACE INTO settings VALUES (?,?,?,?,?,?,?,?)",
                        (notebook, setting_id, status, params, seconds,
                         None if run_dir is None else str(run_dir), error, time.time()))
            con.executemany("INSERT INTO rows VALUES (?,?,?,?)",
                            [(notebook, setting_id, i, json.dumps(dict(r), sort_keys=True, default=str))
                             for i, r in enumerate(rows)])

    def record_run(self, metrics_json: str | Path, notebook: str | None = None, setting_id: str | None = None,
                   parameters: Mapping[str, Any] | None = None, seconds: float | None = None) -> None:
        """Record a run folder's ``metrics.json`` (the schema of ``runs.write_metrics``)."""
        from .runs import read_json

        record = read_json(metrics_json)
        self.record(notebook or record["notebook"], setting_id or record["setting_id"],
                    parameters if parameters is not None else record.get("parameters", {}),
                    rows=record.get("rows", []), seconds=seconds, run_dir=Path(metrics_json).parent)

    def settings(self, notebook: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
        """Recorded settings (newest last), each with its parameters decoded."""
        query, args = "SELECT * FROM settings WHERE 1=1", []
        if notebook is not None:
            query, args = query + " AND notebook=?", [*args, notebook]
        if status is not None:
            query, args = query + " AND status=?", [*args, status]
        with self._connect() as con:
            con.row_factory = sqlite3.Row
            found = con.execute(query + " ORDER BY finished_at", args).fetchall()
        return [{**dict(r), "parameters": json.loads(r["parameters"])} for r in found]

    def completed(self, notebook: str) -> set[str]:
        return {s["setting_id"] for s in self.settings(notebook, status="ok")}

    def metric_rows(self, notebook: str | None = None) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
        """``(notebook, setting_id, parameters, row)`` for every metric row of every ``ok``
        setting, read in one query (a sweep writing meanwhile never gives half a setting)."""
        query = ("SELECT s.notebook, s.setting_id, s.parameters, r.data FROM rows r JOIN settings s "
                 "USING (notebook, setting_id) WHERE s.status='ok'")
        args: list[Any] = []
        if notebook is not None:
            query, args = query + " AND s.notebook=?", [notebook]
        with self._connect() as con:
            found = con.execute(query + " ORDER BY s.notebook, s.setting_id, r.idx", args).fetchall()
        return [(nb, sid, json.loads(params), json.loads(data)) for nb, sid, params, data in found]

    def frame(self, notebook: str | None = None, **filters: Any):
        """One pandas row per metric row of every ``ok`` setting: ``notebook``, ``setting_id``,
        the setting's parameters (prefixed ``param.`` where a metric row of that notebook has a
        field of the same name) and the row's own fields. ``filters`` keep rows whose field or
        parameter equals the value."""
        import pandas as pd

        found = self.metric_rows(notebook)
        fields: dict[str, set[str]] = {}
        for nb, _, _, row in found:
            fields.setdefault(nb, set()).update(row)
        records = [{"notebook": nb, "setting_id": sid,
                    **{(f"param.{k}" if k in fields[nb] else k): v for k, v in params.items()}, **row}
                   for nb, sid, params, row in found]
        frame = pd.DataFrame.from_records(records)
        for key, value in filters.items():
            if key not in frame:
                raise ValueError(f"unknown field {key!r}; valid choices: {', '.join(map(str, frame.columns))}")
            frame = frame[frame[key].astype(str) == str(value)]
        return frame.reset_index(drop=True)

    def export(self, path: str | Path, notebook: str | None = None, **filters: Any) -> Path:
        """Write ``frame(...)`` to ``.csv`` or ``.parquet`` (atomically)."""
        from .runs import atomic_path

        path = Path(path)
        frame = self.frame(notebook, **filters)
        if path.suffix not in (".csv", ".parquet"):
            raise ValueError(f"unknown export format {path.suffix!r}; valid choices: .csv, .parquet")
        with atomic_path(path) as tmp:
            if path.suffix == ".csv":
                frame.to_csv(tmp, index=False)
            else:
                frame.astype({c: str for c in frame.columns if frame[c].dtype == object}).to_parquet(tmp, index=False)
        return path
