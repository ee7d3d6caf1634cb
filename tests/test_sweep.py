"""``backdoorlab sweep``: grid validation and expansion, atomic per-setting folders, resume after
a kill, failures, the results database under concurrent writers, and the Ray executor.

Every execution runs the torch-free fixture notebook ``tests/fixtures/Tiny.ipynb`` (~1-2 s).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from backdoorlab import cli
from backdoorlab.results import ResultsDB
from backdoorlab.sweep import grid as grid_mod
from backdoorlab.sweep import load_grid, parse_grid, sweep

TINY = Path(__file__).parent / "fixtures" / "Tiny.ipynb"
TINY_PARAMS = ["lr", "items", "name", "seed", "delay_ms", "log_file", "device"]


@pytest.fixture
def runs_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "runs"
    monkeypatch.setenv("BACKDOORLAB_RUNS", str(root))
    monkeypatch.setenv("BACKDOORLAB_PROGRESS", "0")
    monkeypatch.delenv("BACKDOORLAB_RUN_DIR", raising=False)
    return root


def write_grid(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def log_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def finished(root: Path) -> list[str]:
    """Setting folders with a done.json."""
    return sorted(p.parent.name for p in (root / "Tiny").glob("*/done.json"))


def partials(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "Tiny").glob(".partial-*"))


# --- grids --------------------------------------------------------------------------------------------------------


def test_grid_expands_product_with_fixed_values_and_stable_ids():
    spec = {"notebook": "Tiny", "fixed": {"name": "x", "delay_ms": 0},
            "cross": {"lr": [0.1, "1e-3", 2], "items": [["a"], ["a", "b"]], "seed": [0, 1]}}
    grid = parse_grid(spec, TINY)
    settings = grid.settings()
    assert len(grid) == len(settings) == 3 * 2 * 2
    assert all(s.parameters["name"] == "x" and s.parameters["delay_ms"] == 0 for s in settings)
    assert {s.parameters["lr"] for s in settings} == {0.1, 0.001, 2.0}  # "1e-3" and 2 become floats
    assert all(isinstance(s.parameters["lr"], float) for s in settings)
    assert {tuple(s.parameters["items"]) for s in settings} == {("a",), ("a", "b")}
    ids = [s.setting_id for s in settings]
    assert len(set(ids)) == len(ids)
    assert ids == [s.setting_id for s in parse_grid(spec, TINY).settings()]  # deterministic
    assert all(re.fullmatch(r"[A-Za-z0-9.+=,_~-]+-[0-9a-f]{8}", i) for i in ids)
    assert "lr=0.001_items=a+b_seed=1-" in " ".join(ids)
    # the hash covers every parameter, fixed ones included
    other = parse_grid({**spec, "fixed": {"name": "y", "delay_ms": 0}}, TINY).settings()
    assert not set(ids) & {s.setting_id for s in other}
    # no cross: one setting
    assert len(parse_grid({"fixed": {"seed": 3}}, TINY).settings()) == 1


def test_grid_file_reads_yaml_exponent_as_float(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("cross:\n  lr: [1e-3, 0.5]\n  seed: [0]\n")  # PyYAML reads 1e-3 as the string "1e-3"
    assert yaml.safe_load(path.read_text())["cross"]["lr"][0] == "1e-3"
    assert [s.parameters["lr"] for s in load_grid(path, TINY).settings()] == [0.001, 0.5]


@pytest.mark.parametrize("spec, message", [
    ({"cross": {"seeds": [0, 1]}}, r"unknown parameter 'seeds' \(did you mean 'seed'\?\); valid parameters of Tiny: "
                                   + ", ".join(TINY_PARAMS)),
    ({"fixed": {"seed": "zero"}}, r"parameter 'seed' is declared int, got str 'zero'"),
    ({"fixed": {"seed": True}}, r"parameter 'seed' is declared int, got bool"),
    ({"cross": {"lr": ["fast"]}}, r"parameter 'lr' is declared float, got str 'fast'"),
    ({"cross": {"items": ["a", "b"]}}, r"parameter 'items' is declared list, got str 'a'"),
    ({"fixed": {"seed": 0}, "cross": {"seed": [1, 2]}}, r"parameter 'seed' is both fixed and crossed"),
    ({"cross": {"seed": 3}}, r"cross parameter 'seed' needs a non-empty list of values, got 3"),
    ({"cross": {"seed": []}}, r"cross parameter 'seed' needs a non-empty list"),
    ({"cross": {"seed": [1, 1]}}, r"cross parameter 'seed' repeats a value"),
    ({"notebook": "Other", "cross": {"seed": [0]}}, r"grid is for notebook 'Other', not 'Tiny'"),
    ({"crosss": {"seed": [0]}}, r"unknown key\(s\) 'crosss'; valid keys: notebook, fixed, cross"),
])
def test_grid_validation_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_grid(spec, TINY)


SHIPPED_GRIDS = sorted((Path(__file__).parents[1] / "grids").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_GRIDS, ids=lambda p: p.name)
def test_every_shipped_grid_is_valid_for_its_notebook(path):
    """A grid in grids/ names its notebook's parameters with the right types, and the attacks,
    defenses and per-attack parameters it fixes exist (the notebook would stop on them later)."""
    from backdoorlab import attacks, defenses
    from backdoorlab.clip import protocol

    notebook = path.name.split(".")[0]
    grid = load_grid(path, Path(__file__).parents[1] / "notebooks" / f"{notebook}.ipynb")
    assert grid.notebook == notebook and len(grid) >= 1
    clip = notebook == "Liang2024BadCLIP"
    attack_names = set(protocol.ATTACKS) if clip else set(attacks.names())
    defense_names = set(protocol.DEFENSES) if clip else set(defenses.names())
    for setting in grid.settings():
        p = setting.parameters
        named = [a for a in p.get("attacks", []) if a != "all"]
        assert set(named) <= attack_names
        assert set(p.get("defenses", [])) - {"all"} <= defense_names
        for name, params in p.get("attack_params", {}).items():
            assert name in named or p.get("attacks") == ["all"], name
            attacks.create(name, **params)  # the parameters exist and pass the attack's own checks


def test_invalid_grid_fails_before_anything_runs(runs_root, tmp_path):
    bad = write_grid(tmp_path / "bad.yaml", {"cross": {"sed": [0, 1], "seed": [0]}})
    with pytest.raises(ValueError, match="unknown parameter 'sed'.*valid parameters of Tiny: lr, items"):
        cli.main(["sweep", str(TINY), "--grid", str(bad)])
    with pytest.raises(ValueError, match="grid file 'nope.yaml' not found"):
        cli.main(["sweep", str(TINY), "--grid", "nope.yaml"])
    ok = write_grid(tmp_path / "ok.yaml", {"cross": {"seed": [0]}})
    with pytest.raises(SystemExit):
        cli.main(["sweep", str(TINY), "--grid", str(ok), "--executor", "dask"])
    with pytest.raises(ValueError, match="workers must be >= 1"):
        cli.main(["sweep", str(TINY), "--grid", str(ok), "--workers", "0"])
    with pytest.raises(ValueError, match="devices apply to the local executor"):
        cli.main(["sweep", str(TINY), "--grid", str(ok), "--executor", "ray", "--devices", "0,1"])
    with pytest.raises(ValueError, match="gpus_per_task apply to the ray executor"):
        cli.main(["sweep", str(TINY), "--grid", str(ok), "--gpus-per-task", "1"])
    assert not runs_root.exists() or not (runs_root / "Tiny").exists()


# --- local executor -------------------------------------------------------------------------------------------------


def test_local_sweep_two_workers_end_to_end(runs_root, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    log = tmp_path / "log.jsonl"
    gfile = write_grid(tmp_path / "g.yaml", {"fixed": {"log_file": str(log)},
                                             "cross": {"lr": [0.5, 2], "items": [["a"], ["a", "b"]]}})
    settings = load_grid(gfile, TINY).settings()
    ids = sorted(s.setting_id for s in settings)
    stale = runs_root / "Tiny" / ".failed" / f"{ids[0]}.txt"  # a failure of an earlier sweep, to be cleared
    stale.parent.mkdir(parents=True)
    stale.write_text("old traceback")

    # two workers, one (fake) device each: the fixture never touches a GPU
    assert cli.main(["sweep", str(TINY), "--grid", str(gfile), "--workers", "2", "--devices", "7,9"]) == 0
    assert "4 settings: 4 ran ok, 0 failed, 0 already done" in capsys.readouterr().out
    assert finished(runs_root) == ids and partials(runs_root) == [] and not stale.exists()
    envs = [json.loads((runs_root / "Tiny" / i / "done.json").read_text())["environment"] for i in ids]
    device_of = {env["pid"]: env["cuda_visible_devices"] for env in envs}  # one device per worker process
    assert os.getpid() not in device_of and len(device_of) <= 2 and set(device_of.values()) <= {"7", "9"}
    assert len(set(device_of.values())) == len(device_of)  # round robin: distinct workers, distinct devices
    assert all(env["notebook"]["cuda_visible_devices"] == env["cuda_visible_devices"] for env in envs)  # kernel sees it
    share = str(max(1, (os.cpu_count() or 1) // 2))  # two kernels at once: each gets half of the cores
    assert all(env["notebook"]["omp_num_threads"] == share for env in envs)
    for s in settings:
        folder = runs_root / "Tiny" / s.setting_id
        done = json.loads((folder / "done.json").read_text())
        assert done["parameters"] == s.parameters and done["seconds"] > 0
        executed = json.loads((folder / "Tiny.ipynb").read_text())
        injected = [c for c in executed["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
        assert injected and f"lr = {s.parameters['lr']}" in "".join(injected[0]["source"])
        assert (folder / "items.txt").read_text().split() == s.parameters["items"]
        metrics = json.loads((folder / "metrics.json").read_text())
        assert ".partial-" in metrics["environment"]["run_dir"]  # written through BACKDOORLAB_RUN_DIR
        assert [r["item"] for r in metrics["rows"]] == s.parameters["items"]

    db = ResultsDB()
    rows = db.settings("Tiny")
    assert sorted(r["setting_id"] for r in rows) == ids and {r["status"] for r in rows} == {"ok"}
    assert {r["setting_id"]: r["parameters"] for r in rows} == {s.setting_id: s.parameters for s in settings}
    frame = db.frame("Tiny")
    assert len(frame) == sum(len(s.parameters["items"]) for s in settings)
    assert sorted(frame["setting_id"].unique()) == ids

    # a second sweep runs nothing; a lost database is rebuilt from the folders without executing anything
    assert cli.main(["sweep", str(TINY), "--grid", str(gfile)]) == 0
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db.path}{suffix}").unlink(missing_ok=True)
    assert cli.main(["sweep", str(TINY), "--grid", str(gfile)]) == 0
    out = capsys.readouterr().out
    assert "0 ran ok, 0 failed, 4 already done (4 recorded from their folders)" in out
    assert len(log_lines(log)) == 4
    pd.testing.assert_frame_equal(ResultsDB().frame("Tiny"), frame)

    # results: table, filters, exports
    assert cli.main(["results", "--notebook", "Tiny", "--where", "lr=2.0"]) == 0
    out = capsys.readouterr().out
    assert all(i in out for i in ids if "lr=2.0" in i) and not any(i in out for i in ids if "lr=0.5" in i)
    assert cli.main(["results", "--csv", str(tmp_path / "r.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "r.csv")) == len(frame)
    assert cli.main(["results", "--notebook", "Tiny", "--where", "item=b", "--parquet", str(tmp_path / "r.parquet")]) == 0
    assert sorted(pd.read_parquet(tmp_path / "r.parquet")["setting_id"]) == sorted(frame[frame["item"] == "b"]["setting_id"])


def test_kill_and_resume(runs_root, tmp_path):
    log = tmp_path / "log.jsonl"
    gfile = write_grid(tmp_path / "g.yaml", {"fixed": {"log_file": str(log), "delay_ms": 1000},
                                             "cross": {"seed": [0, 1, 2, 3]}})
    ids = sorted(s.setting_id for s in load_grid(gfile, TINY).settings())
    cmd = [sys.executable, "-m", "backdoorlab", "sweep", str(TINY), "--grid", str(gfile), "--workers", "1"]
    proc = subprocess.Popen(cmd, env=os.environ.copy(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while not finished(runs_root):
            assert proc.poll() is None and time.monotonic() < deadline, "the sweep ended before the kill"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = finished(runs_root)
    assert 1 <= len(before) < len(ids)
    # ipykernel exits within a second of losing its parent; let the orphaned kernel go first
    kernels = {line["pid"] for line in log_lines(log)}
    while any(_alive(pid) for pid in kernels) and time.monotonic() < deadline:
        time.sleep(0.1)

    assert cli.main(["sweep", str(TINY), "--grid", str(gfile)]) == 0
    assert finished(runs_root) == ids and partials(runs_root) == []
    assert sorted(p.name for p in (runs_root / "Tiny").iterdir()) == ids  # one folder per setting, nothing else
    rows = ResultsDB().settings("Tiny")
    assert sorted(r["setting_id"] for r in rows) == ids and {r["status"] for r in rows} == {"ok"}
    runs_per_seed = pd.Series([line["seed"] for line in log_lines(log)]).value_counts()
    done_before = {json.loads((runs_root / "Tiny" / i / "done.json").read_text())["parameters"]["seed"] for i in before}
    assert all(runs_per_seed[seed] == 1 for seed in done_before)  # not executed again
    assert set(runs_per_seed.index) == {0, 1, 2, 3}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_failing_setting_is_recorded_and_retried(runs_root, tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    gfile = write_grid(tmp_path / "g.yaml", {"fixed": {"log_file": str(log)}, "cross": {"lr": [0.1, -1.0, 0.3]}})
    by_lr = {s.parameters["lr"]: s.setting_id for s in load_grid(gfile, TINY).settings()}
    bad = by_lr[-1.0]

    assert cli.main(["sweep", str(TINY), "--grid", str(gfile)]) == 1
    out = capsys.readouterr().out
    assert "2 ran ok, 1 failed" in out and f"FAILED {bad}: ValueError: lr must be >= 0, got -1.0" in out
    assert finished(runs_root) == sorted([by_lr[0.1], by_lr[0.3]]) and partials(runs_root) == []
    failed_dir = runs_root / "Tiny" / ".failed"
    assert "lr must be >= 0" in (failed_dir / f"{bad}.txt").read_text()
    assert (failed_dir / f"{bad}.ipynb").exists()  # the executed notebook with the failing cell
    status = {r["setting_id"]: r for r in ResultsDB().settings("Tiny")}
    assert status[bad]["status"] == "failed" and "ValueError: lr must be >= 0" in status[bad]["error"]
    assert status[by_lr[0.1]]["status"] == status[by_lr[0.3]]["status"] == "ok"
    assert bad not in set(ResultsDB().frame("Tiny")["setting_id"])

    assert cli.main(["sweep", str(TINY), "--grid", str(gfile)]) == 1  # retries only the failed one
    assert "0 ran ok, 1 failed, 2 already done" in capsys.readouterr().out
    assert sorted(line["lr"] for line in log_lines(log)) == [-1.0, -1.0, 0.1, 0.3]
    assert len(ResultsDB().settings("Tiny")) == 3


# --- results database under concurrent writers --------------------------------------------------------------------


def test_results_db_concurrent_writers(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TINY.parent))  # spawned children inherit sys.path
    from sweep_db_writer import write_settings

    path = str(tmp_path / "results.sqlite")
    ResultsDB(path)
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=write_settings, args=(path, w, 25)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 8
    db = ResultsDB(path)
    ids = [s["setting_id"] for s in db.settings("Concurrent")]
    assert len(ids) == len(set(ids)) == 8 * 25 + 1
    frame = db.frame("Concurrent")
    assert len(frame) == 8 * 25 * 3 + 1
    assert not frame.duplicated(["setting_id", "k"]).any()


# --- Ray executor -------------------------------------------------------------------------------------------------


def test_ray_executor_runs_the_grid(runs_root, tmp_path):
    pytest.importorskip("ray")
    gfile = write_grid(tmp_path / "g.yaml", {"cross": {"seed": [0, 1, 2]}})
    grid = load_grid(gfile, TINY)
    report = sweep(grid, executor="ray", workers=2)
    ids = sorted(s.setting_id for s in grid.settings())
    assert sorted(report.ok) == ids and not report.failed
    assert finished(runs_root) == ids and partials(runs_root) == []
    rows = ResultsDB().settings("Tiny")
    assert sorted(r["setting_id"] for r in rows) == ids and {r["status"] for r in rows} == {"ok"}
    pids = {json.loads((runs_root / "Tiny" / i / "done.json").read_text())["environment"]["pid"] for i in ids}
    assert os.getpid() not in pids  # executed in Ray workers; recorded by this (driver) process


def test_ray_missing_is_a_clear_error(runs_root, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    grid = load_grid(write_grid(tmp_path / "g.yaml", {"cross": {"seed": [0]}}), TINY)
    with pytest.raises(RuntimeError, match=r"pip install 'backdoorlab\[ray\]'"):
        sweep(grid, executor="ray")
    assert not (runs_root / "Tiny").exists()


def test_setting_id_is_filesystem_safe():
    sid = grid_mod.setting_id({"device": "cuda:0", "items": ["a/b", "c d"], "x": {"k": 1}}, ["device", "items", "x"])
    assert re.fullmatch(r"[A-Za-z0-9.+=,_~-]+-[0-9a-f]{8}", sid) and "/" not in sid
