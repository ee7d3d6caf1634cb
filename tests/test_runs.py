import json

import pytest

from backdoorlab import cli, paths, runs


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out" / "metrics.json"
    runs.write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with runs.atomic_path(target) as tmp:
            tmp.write_text("half a result")
            raise RuntimeError("interrupted")
    assert json.loads(target.read_text()) == {"a": 1}  # the old result survives
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]  # no temp files left


def test_metrics_json_schema(tmp_path, monkeypatch):
    monkeypatch.setenv("BACKDOORLAB_RUNS", str(tmp_path))
    path = runs.write_metrics("Nb", "set-1", {"seed": 0}, [{"attack": "badnets", "defense": "none", "acc": 0.9}])
    assert path == tmp_path / "Nb" / "set-1" / "metrics.json"
    record = json.loads(path.read_text())
    assert record["notebook"] == "Nb" and record["setting_id"] == "set-1" and record["parameters"] == {"seed": 0}
    assert record["rows"][0]["acc"] == 0.9
    assert {"backdoorlab", "torch", "device", "git", "python"} <= set(record["environment"])


def test_paths_follow_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("BACKDOORLAB_RUNS", str(tmp_path / "r"))
    monkeypatch.setenv("BACKDOORLAB_DATA", str(tmp_path / "d"))
    assert paths.runs_dir() == tmp_path / "r" and paths.zoo_dir() == tmp_path / "r" / "zoo"
    assert paths.data_dir() == tmp_path / "d"


def test_cli_rejects_unknown_notebook_and_scale():
    with pytest.raises(SystemExit, match="unknown notebook 'Nope2099'; valid choices: .*Wu2022BackdoorBench"):
        cli.main(["reproduce", "Nope2099"])
    with pytest.raises(ValueError, match="unknown scale 'tiny'"):
        cli.main(["reproduce", "--scale", "tiny", "Wu2022BackdoorBench"])


def test_cli_lists_registries(capsys):
    cli.main(["list"])
    out = capsys.readouterr().out
    assert "badnets" in out and "ft" in out and "mnist5k" in out and "Wu2022BackdoorBench" in out


def test_notebooks_are_stored_without_outputs():
    for nb in paths.notebooks_dir().glob("*.ipynb"):
        cells = json.loads(nb.read_text())["cells"]
        code = [c for c in cells if c["cell_type"] == "code"]
        assert all(not c["outputs"] and c["execution_count"] is None for c in code), nb.name
        ids = [c.get("id") for c in cells]  # nbformat 4.5: every cell has a unique id
        assert all(ids) and len(set(ids)) == len(ids), nb.name
        assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in code), nb.name


def test_papermill_sees_every_parameter():
    import re

    import papermill as pm

    for nb in paths.notebooks_dir().glob("*.ipynb"):
        cells = json.loads(nb.read_text())["cells"]
        source = next("".join(c["source"]) for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
        declared = re.findall(r"^(\w+)\s*:", source, flags=re.M)
        assert declared and set(declared) == set(pm.inspect_notebook(str(nb))), nb.name
