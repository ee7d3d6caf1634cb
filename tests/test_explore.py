"""The ipywidgets results explorer: filters, metric choice, bad input."""
import pandas as pd
import pytest

from backdoorlab import explore


@pytest.fixture
def table():
    return pd.DataFrame({"attack": ["badnets", "badnets", "blended", "blended"],
                         "defense": ["none", "ft", "none", "ft"],
                         "acc": [0.98, 0.93, 0.97, 0.92], "asr": [1.0, 0.01, 0.99, 0.2], "seconds": [30, 20, 31, 21]})


def test_columns_and_selection(table):
    assert explore.filter_columns(table) == ["attack", "defense"]
    assert explore.metric_columns(table) == ["acc", "asr"]
    rows = explore.select(table, {"attack": "blended", "defense": explore.ALL})
    assert list(rows.asr) == [0.99, 0.2]


def test_widget_redraws_on_filter_change(table):
    pytest.importorskip("ipywidgets")
    box = explore.results_explorer(table, metric="asr")
    attack, defense, metric = box.children[0].children
    assert metric.value == "asr" and attack.options == (explore.ALL, "badnets", "blended")
    attack.value = "badnets"  # triggers a redraw, which must not raise
    metric.value = "acc"


def test_unknown_metric_names_the_choices(table):
    with pytest.raises(ValueError, match="valid choices: acc, asr"):
        explore.results_explorer(table, metric="der")
