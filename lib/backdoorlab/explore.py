"""An ipywidgets explorer of result rows (a notebook's table, or ``ResultsDB().frame()``).

Dropdowns filter by every identifying column (attack, defense, ...) and pick the metric; the
view shows the filtered rows and a bar plot of the metric. Notebooks build it only when their
``interactive`` parameter is true, so papermill and nbval never wait on a widget.
"""
from __future__ import annotations

from typing import Any, Sequence

ALL = "(all)"


def filter_columns(frame: Any, candidates: Sequence[str] = ("attack", "defense", "detector", "notebook")) -> list[str]:
    """The identifying columns present in ``frame`` that have more than one value."""
    return [c for c in candidates if c in frame and frame[c].nunique() > 1]


def metric_columns(frame: Any) -> list[str]:
    """Numeric columns other than bookkeeping ones (seed, seconds, counts)."""
    skip = {"seed", "seconds", "setting_seconds", "poisoned", "clean_samples", "idx"}
    return [c for c in frame.columns if c not in skip and frame[c].dtype.kind in "fi"]


def select(frame: Any, choices: dict[str, str]) -> Any:
    """Rows of ``frame`` matching every non-``(all)`` choice."""
    for column, value in choices.items():
        if value != ALL:
            frame = frame[frame[column].astype(str) == value]
    return frame


def results_explorer(frame: Any, metric: str | None = None):
    """A widget: one dropdown per identifying column, a metric dropdown, the filtered table and
    a bar plot (mean over repeated rows) of the chosen metric."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from IPython.display import display

    columns, metrics = filter_columns(frame), metric_columns(frame)
    if not metrics:
        raise ValueError(f"no numeric metric column to explore; columns: {', '.join(map(str, frame.columns))}")
    if metric is not None and metric not in metrics:
        raise ValueError(f"unknown metric {metric!r}; valid choices: {', '.join(metrics)}")
    pickers = {c: widgets.Dropdown(options=[ALL, *sorted(frame[c].astype(str).unique())], description=c)
               for c in columns}
    metric_picker = widgets.Dropdown(options=metrics, value=metric or metrics[0], description="metric")
    out = widgets.Output()

    def redraw(*_: Any) -> None:
        rows = select(frame, {c: p.value for c, p in pickers.items()})
        out.clear_output(wait=True)
        with out:
            if rows.empty:
                print("no rows match")
                return
            name = metric_picker.value
            by = [c for c in columns if pickers[c].value == ALL] or columns[:1] or [rows.columns[0]]
            means = rows.groupby(by)[name].mean().sort_values()
            fig, ax = plt.subplots(figsize=(7, 0.25 * len(means) + 1))
            means.plot.barh(ax=ax, color="#4c72b0")
            ax.set_xlabel(name)
            ax.set_ylabel(" / ".join(by))
            plt.show()
            display(rows[[*columns, *[c for c in metrics if c in rows]]].round(4))

    for widget in [*pickers.values(), metric_picker]:
        widget.observe(redraw, names="value")
    redraw()
    return widgets.VBox([widgets.HBox([*pickers.values(), metric_picker]), out])
