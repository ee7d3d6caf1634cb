"""Batch execution of notebooks over parameter grids (``backdoorlab sweep``).

``grid``: YAML grid files, validated against a notebook's parameters cell and expanded into
settings with deterministic ids. ``execute``: running one setting atomically with papermill,
the local (process pool) and Ray executors, and the resumable driver that records results in
``runs/results.sqlite``.
"""
from .execute import EXECUTORS, SweepReport, run_setting, sweep
from .grid import Grid, GridSetting, load_grid, parse_grid, setting_id

__all__ = ["EXECUTORS", "Grid", "GridSetting", "SweepReport", "load_grid", "parse_grid", "run_setting", "setting_id",
           "sweep"]
