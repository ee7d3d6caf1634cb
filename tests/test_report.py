"""The rendered report (backdoorlab.report) on a small fixture database: tables with
mean ± std over seeds, failed settings, notebook pages, paper numbers, escaping, rebuilds."""
from __future__ import annotations

import html
import math
import os
import re
import statistics
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook, new_output

from backdoorlab import papers, report
from backdoorlab.results import ResultsDB

DEMO = "Demo2024Paper"
KARIM = "Karim2024Augmented"
SCRIPT = "<script>alert(1)</script>"
ERROR = "Traceback (most recent call last):\n  File \"nb.py\", line 3, in <module>\nValueError: boom <b>bold</b>"


def demo_rows(seed: int) -> list[dict]:
    """Defense rows (acc, asr, clean_samples as a condition) and a second row kind (pearson_r)."""
    rows = [{"attack": a, "defense": d, "acc": 0.9 - 0.013 * i - 0.021 * seed + 0.004 * seed * i,
             "asr": 0.97 - 0.3 * i + 0.017 * seed, "clean_samples": 100 if d != "none" else math.nan}
            for i, (a, d) in enumerate([(a, d) for a in ("badnets", "blended") for d in ("none", "ft")])]
    return rows + [{"attack": "badnets", "observation": 1, "pearson_r": 0.5 + 0.1 * seed}]


def karim_rows(seed: int) -> list[dict]:
    return [{"attack": "badnets", "defense": d, "acc": 0.95 - 0.02 * i + 0.01 * seed,
             "asr": 0.9 - 0.8 * i + 0.03 * seed} for i, d in enumerate(("none", "nft"))]


def tiny_notebook(path: Path) -> None:
    cell = new_code_cell("print('hello from the fixture')", execution_count=1,
                         outputs=[new_output("stream", name="stdout", text="hello from the fixture\n")])
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(new_notebook(cells=[cell]), str(path))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A database with two seeds of a demo notebook (and a failed third) and two of Karim2024Augmented
    (the second without its notebook file), built once into ``runs/report``."""
    runs = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BACKDOORLAB_RUNS", str(runs))
        db = ResultsDB(runs / "results.sqlite")
        for seed in (0, 1):
            sid = f"mnist5k-s{seed}-smoke"
            folder = runs / DEMO / sid
            tiny_notebook(folder / f"{DEMO}.ipynb")
            db.record(DEMO, sid, {"dataset": "mnist5k", "scale": "smoke", "seed": seed, "note": SCRIPT,
                                  "attacks": ["badnets", "blended"]},
                      rows=demo_rows(seed), seconds=10.0 + seed, run_dir=folder)
            folder = runs / KARIM / sid
            if seed == 0:
                tiny_notebook(folder / f"{KARIM}.ipynb")
            folder.mkdir(parents=True, exist_ok=True)
            db.record(KARIM, sid, {"dataset": "mnist5k", "seed": seed}, rows=karim_rows(seed), run_dir=folder)
        # as the sweep records a failure: no run folder, the executed notebook under .failed/
        tiny_notebook(runs / DEMO / ".failed" / "mnist5k-s2-smoke.ipynb")
        db.record(DEMO, "mnist5k-s2-smoke", {"dataset": "mnist5k", "scale": "smoke", "seed": 2, "note": SCRIPT},
                  status="failed", error=ERROR, seconds=3.0)
        index = report.build()
    return runs, index


def section(text: str, notebook: str) -> str:
    return text.split(f'<h2 id="nb-{notebook}">')[1].split("<h2 ")[0]


def tables(fragment: str) -> list[tuple[list[str], list[list[str]]]]:
    """(header, rows) of every HTML table, cells as unescaped text."""
    def cells(row: str, tag: str) -> list[str]:
        return [html.unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(rf"<{tag}>(.*?)</{tag}>", row)]
    found = []
    for table in re.findall(r"<table>(.*?)</table>", fragment, re.S):
        head, body = table.split("</thead>")
        found.append((cells(head, "th"), [cells(r, "td") for r in re.findall(r"<tr>(.*?)</tr>", body)]))
    return found


def cell(fragment: str, metric: str, **keys: str) -> str:
    """The ``metric`` cell of the (first) row matching ``keys`` in a table with those columns."""
    for header, rows in tables(fragment):
        if metric in header and set(keys) <= set(header):
            for row in rows:
                if all(row[header.index(k)] == v for k, v in keys.items()):
                    return row[header.index(metric)]
    raise AssertionError(f"no {metric} for {keys}")


def test_builds_both_pages_and_figures(built):
    runs, index = built
    assert index == runs / "report" / "index.html" and index.exists()
    text, md = index.read_text(), (runs / "report" / "index.md").read_text()
    assert "<script" not in text.lower().replace(html.escape(SCRIPT).lower(), "")  # no JavaScript at all
    images = re.findall(r'<img src="([^"]+)"', text)
    assert len(images) == 2 and all(src.startswith("figures/") for src in images)  # no figure of a single bar
    for src in images:
        assert (index.parent / src).read_bytes()[:4] == b"\x89PNG"
        assert f"]({src})" in md  # the Markdown version embeds the same figures


def test_mean_std_over_seeds(built):
    runs, index = built
    text, md = index.read_text(), (runs / "report" / "index.md").read_text()
    for attack, defense in [("badnets", "ft"), ("blended", "none")]:
        for metric in ("acc", "asr"):
            values = [r[metric] for seed in (0, 1) for r in demo_rows(seed)
                      if r.get("attack") == attack and r.get("defense") == defense]
            expected = f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} (2)"
            assert cell(section(text, DEMO), metric, attack=attack, defense=defense) == expected
            assert expected in md
    assert cell(section(text, DEMO), "clean_samples", attack="badnets", defense="ft") == "100"  # a key, not averaged
    r = [0.5 + 0.1 * seed for seed in (0, 1)]  # the second row kind gets its own table, its one group
    assert cell(section(text, DEMO), "pearson_r") == f"{statistics.mean(r):.3f} ± {statistics.stdev(r):.3f} (2)"
    assert "All rows: attack = badnets; observation = 1." in section(text, DEMO)  # constant keys in the note


def test_failed_setting_shows_its_error(built):
    runs, index = built
    text, md = index.read_text(), (runs / "report" / "index.md").read_text()
    overview = text.split('<h2 id="nb-')[0]
    assert cell(overview, "failed", notebook=DEMO) == "1" and cell(overview, "ok", notebook=DEMO) == "2"
    assert cell(overview, "error", setting="mnist5k-s2-smoke") == "ValueError: boom <b>bold</b>"
    assert cell(section(text, DEMO), "status", setting="mnist5k-s2-smoke") == "failed"
    assert cell(section(text, DEMO), "notebook", setting="mnist5k-s2-smoke") == "html"  # from .failed/
    assert html.escape('File "nb.py", line 3') in section(text, DEMO)  # the full traceback
    assert "ValueError: boom &lt;b&gt;bold&lt;/b&gt;" in md


def test_notebook_links_point_to_converted_html(built):
    runs, index = built
    text = index.read_text()
    links = re.findall(r'<a href="(notebooks/[^"]+)">', text)
    assert len(links) == 4  # three demo settings (one failed) and the first Karim seed; the second has none
    for link in links:
        page = index.parent / link
        assert page.exists() and "hello from the fixture" in page.read_text()
    assert cell(section(text, KARIM), "notebook", setting="mnist5k-s1-smoke") == "missing"


def test_paper_numbers_beside_ours(built):
    _, index = built
    text = section(index.read_text(), KARIM)
    assert html.escape(papers.KARIM2024_SETTING) in text
    for i, defense in enumerate(("none", "nft")):
        asr, acc = papers.KARIM2024_TABLE1["badnets"][defense]
        assert cell(text, "ASR paper (%)", attack="badnets", defense=defense) == f"{asr:.2f}"
        assert cell(text, "ACC paper (%)", attack="badnets", defense=defense) == f"{acc:.2f}"
        ours = [100 * karim_rows(seed)[i]["asr"] for seed in (0, 1)]
        assert cell(text, "ASR ours (%)", attack="badnets", defense=defense) == \
            f"{statistics.mean(ours):.2f} ± {statistics.stdev(ours):.2f} (2)"
    assert "Paper numbers" not in section(index.read_text(), DEMO)


def test_strings_from_the_database_are_escaped(built):
    runs, index = built
    for page in (index, runs / "report" / "index.md"):
        text = page.read_text()
        assert SCRIPT not in text and "<b>bold" not in text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_rebuild_is_idempotent_and_cheap(built):
    runs, index = built
    out = index.parent

    def snapshot() -> dict[str, float]:
        return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    def strip(text: str) -> str:
        return re.sub(r"Built [^.]*UTC\.", "", text)

    before, pages = snapshot(), {p: strip((out / p).read_text()) for p in ("index.html", "index.md")}
    report.build(runs_dir=runs)
    after = snapshot()
    assert after.keys() == before.keys()  # nothing new, nothing left behind
    assert not [p for p in after if Path(p).name.startswith(".")]  # no temporary files of atomic writes
    assert all(after[p] == before[p] for p in after if p.startswith(("figures/", "notebooks/")))  # not redrawn
    assert {p: strip((out / p).read_text()) for p in pages} == pages
    # an executed notebook newer than its page is converted again
    ipynb = runs / DEMO / "mnist5k-s0-smoke" / f"{DEMO}.ipynb"
    os.utime(ipynb, ns=(after["notebooks/Demo2024Paper/mnist5k-s0-smoke.html"] + 10**9,) * 2)
    report.build(runs_dir=runs)
    assert (out / "notebooks/Demo2024Paper/mnist5k-s0-smoke.html").stat().st_mtime_ns > \
        after["notebooks/Demo2024Paper/mnist5k-s0-smoke.html"]


def test_missing_database_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("BACKDOORLAB_RUNS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no results database"):
        report.build()
    assert not (tmp_path / "results.sqlite").exists()


def test_error_summary_takes_the_exception_line():
    assert report.error_summary("\x1b[0;31mTraceback\x1b[0m\n  x\nKeyError: 'a'\n") == "KeyError: 'a'"
    assert report.error_summary("killed by signal 9") == "killed by signal 9"
