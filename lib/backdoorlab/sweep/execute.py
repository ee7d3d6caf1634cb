"""Running a grid: one papermill execution per setting, locally or on Ray, resumable.

Each setting executes into a hidden ``runs/<Notebook>/.partial-<setting-id>-<pid>/`` folder
(the notebook finds it through ``$BACKDOORLAB_RUN_DIR``, see ``runs.run_dir``). On success a
``done.json`` is written into it and the folder is renamed to ``runs/<Notebook>/<setting-id>/``
in one atomic step, so a killed sweep never leaves a half-written result; a failure leaves
its traceback (and the executed notebook) in ``runs/<Notebook>/.failed/``. Only the driver
(the ``sweep`` process) writes the results database, so SQLite is written on one host even
when the settings run on a Ray cluster.
"""
from __future__ import annotations

import multiprocessing
import os
import platform
import re
import shutil
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from .. import paths, runs
from ..results import ResultsDB
from .grid import Grid, GridSetting

RUN_DIR_ENV = "BACKDOORLAB_RUN_DIR"
EXECUTORS = ("local", "ray")
DONE = "done.json"
FAILED_DIR = ".failed"
PARTIAL_PREFIX = ".partial-"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _environment() -> dict[str, Any]:
    """Where a setting ran (without importing torch; the notebook's own ``metrics.json`` has that)."""
    from .. import __version__

    env = {"backdoorlab": __version__, "python": platform.python_version(), "host": platform.node(),
           "pid": os.getpid(), "git": runs.git_revision()}
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        env["cuda_visible_devices"] = os.environ["CUDA_VISIBLE_DEVICES"]
    return env


def _failure(setting_id: str, parameters: dict, error: str, seconds: float | None = None) -> dict[str, Any]:
    return {"setting_id": setting_id, "parameters": parameters, "status": "failed", "seconds": seconds,
            "rows": [], "run_dir": None, "error": error}


def run_setting(notebook_path: str, notebook: str, setting_id: str, parameters: dict[str, Any], runs_root: str,
                env: dict[str, str] | None = None, kernel_name: str = "python3") -> dict[str, Any]:
    """Execute one setting (in a worker) and return its result dict; failures are returned, not raised.

    ``env`` is set in ``os.environ`` for the execution (the kernel inherits it) and restored after.
    """
    import papermill as pm

    root = Path(runs_root) / notebook
    final, partial = root / setting_id, root / f"{PARTIAL_PREFIX}{setting_id}-{os.getpid()}"
    failed = root / FAILED_DIR
    env = {**(env or {}), "BACKDOORLAB_RUNS": str(runs_root), RUN_DIR_ENV: str(partial)}
    saved = {k: os.environ.get(k) for k in env}
    start = time.perf_counter()
    try:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        os.environ.update(env)
        pm.execute_notebook(notebook_path, str(partial / f"{notebook}.ipynb"), parameters=parameters,
                            kernel_name=kernel_name, progress_bar=False, cwd=str(Path(notebook_path).parent))
        seconds = time.perf_counter() - start
        metrics = runs.read_json(partial / "metrics.json") if (partial / "metrics.json").exists() else {}
        runs.write_json(partial / DONE, {"notebook": notebook, "setting_id": setting_id, "parameters": parameters,
                                         "seconds": seconds, "finished_at": time.time(),
                                         "environment": {**_environment(), "notebook": metrics.get("environment")}})
        try:
            os.rename(partial, final)  # atomic: the folder appears complete or not at all
        except OSError:
            if not (final / DONE).exists():
                raise
            shutil.rmtree(partial)  # another sweep finished this setting first; keep its folder
        for stale in (failed / f"{setting_id}.txt", failed / f"{setting_id}.ipynb"):
            stale.unlink(missing_ok=True)
        try:
            failed.rmdir()  # only if no failure is left in it
        except OSError:
            pass
        return {"setting_id": setting_id, "parameters": parameters, "status": "ok", "seconds": seconds,
                "rows": metrics.get("rows", []), "run_dir": str(final), "error": None}
    except Exception:
        error = _ANSI.sub("", traceback.format_exc())
        try:
            runs.write_text(failed / f"{setting_id}.txt", error)
            if (partial / f"{notebook}.ipynb").exists():  # the executed notebook shows the failing cell
                os.replace(partial / f"{notebook}.ipynb", failed / f"{setting_id}.ipynb")
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return _failure(setting_id, parameters, error, time.perf_counter() - start)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# --- executors: each yields result dicts as settings complete -------------------------------------------------


def _init_worker(devices: Sequence[str], counter: Any, threads: int) -> None:
    """Give each local worker process one device, round robin (the notebook's ``auto`` then sees one GPU),
    and its share of the CPU threads (its kernels inherit ``OMP_NUM_THREADS``; a value the user set is kept)."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    if devices:
        with counter.get_lock():
            index, counter.value = counter.value, counter.value + 1
        os.environ["CUDA_VISIBLE_DEVICES"] = str(devices[index % len(devices)])


def thread_share(workers: int) -> int:
    """CPU threads per worker when ``workers`` settings run at once: without a share, every kernel's torch
    takes all cores and they oversubscribe the machine."""
    return max(1, (os.cpu_count() or 1) // workers)


def run_local(tasks: list[dict], workers: int = 1, devices: Sequence[str] = ()) -> Iterator[dict]:
    """A spawn-context process pool (in-process when ``workers == 1`` and no devices)."""
    if not tasks:
        return
    if workers == 1 and not devices:
        for task in tasks:
            yield run_setting(**task)
        return
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                               initargs=(list(devices), context.Value("i", 0), thread_share(workers)))
    try:
        futures = {pool.submit(run_setting, **task): task for task in tasks}
        for future in as_completed(futures):
            try:
                yield future.result()
            except Exception:  # a worker died (killed, out of memory): the pool is broken
                task = futures[future]
                yield _failure(task["setting_id"], task["parameters"], traceback.format_exc())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def import_ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise RuntimeError("the ray executor needs Ray: pip install 'backdoorlab[ray]'") from err
    return ray


def run_ray(tasks: list[dict], address: str | None = None, workers: int | None = None,
            gpus_per_task: float = 0.0) -> Iterator[dict]:
    """One Ray task per setting, on the cluster at ``address`` or a local instance with ``workers`` CPUs."""
    ray = import_ray()
    if not tasks:
        return
    started = not ray.is_initialized()
    if address:
        ray.init(address=address, ignore_reinit_error=True)
    else:
        ray.init(num_cpus=workers or os.cpu_count(), include_dashboard=False, ignore_reinit_error=True)
    remote = ray.remote(num_cpus=1, num_gpus=gpus_per_task, max_retries=0)(run_setting)
    try:
        pending = {remote.remote(**task): task for task in tasks}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                task = pending.pop(ref)
                try:
                    yield ray.get(ref)
                except Exception:  # the worker died or the task could not start
                    yield _failure(task["setting_id"], task["parameters"], traceback.format_exc())
    finally:
        if started:
            ray.shutdown()


# --- the driver --------------------------------------------------------------------------------------------------


@dataclass
class SweepReport:
    notebook: str
    ok: list[str] = field(default_factory=list)  # executed now
    failed: dict[str, str] = field(default_factory=dict)  # setting id -> traceback
    skipped: list[str] = field(default_factory=list)  # already done (folder with done.json)
    recovered: list[str] = field(default_factory=list)  # done but missing from the database: recorded now
    failed_dir: Path | None = None

    def summary(self) -> str:
        total = len(self.ok) + len(self.failed) + len(self.skipped)
        lines = [f"[backdoorlab] sweep {self.notebook}: {total} settings: {len(self.ok)} ran ok, "
                 f"{len(self.failed)} failed, {len(self.skipped)} already done"
                 + (f" ({len(self.recovered)} recorded from their folders)" if self.recovered else "")]
        for sid, error in self.failed.items():
            last = [line for line in error.strip().splitlines() if line.strip()][-1:] or [""]
            lines.append(f"  FAILED {sid}: {last[0].strip()}  (traceback: {self.failed_dir}/{sid}.txt)")
        return "\n".join(lines)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_partials(root: Path) -> list[Path]:
    """Delete the partial folders of settings whose worker is no longer running."""
    removed = []
    for folder in root.glob(f"{PARTIAL_PREFIX}*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if folder.is_dir() and not (pid.isdigit() and _pid_alive(int(pid))):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def record_result(db: ResultsDB, notebook: str, result: dict[str, Any]) -> None:
    """Write one worker result into the database (driver side)."""
    db.record(notebook, result["setting_id"], result["parameters"], status=result["status"],
              rows=result.get("rows", []), seconds=result.get("seconds"), run_dir=result.get("run_dir"),
              error=result.get("error"))


def record_folder(db: ResultsDB, notebook: str, folder: Path) -> None:
    """Record a finished setting from its folder (``done.json`` and ``metrics.json``), without re-running it."""
    done = runs.read_json(folder / DONE)
    metrics = runs.read_json(folder / "metrics.json") if (folder / "metrics.json").exists() else {}
    db.record(notebook, folder.name, done["parameters"], rows=metrics.get("rows", []), seconds=done.get("seconds"),
              run_dir=folder)


def _progress_enabled() -> bool:
    return os.environ.get("BACKDOORLAB_PROGRESS", "1").lower() not in ("0", "false", "off", "no")


def sweep(grid: Grid, executor: str = "local", workers: int | None = None, devices: Sequence[str] = (),
          ray_address: str | None = None, gpus_per_task: float = 0.0, db: ResultsDB | None = None,
          kernel_name: str = "python3") -> SweepReport:
    """Run every setting of ``grid`` that has no finished folder yet; record results as they complete."""
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; valid choices: {', '.join(EXECUTORS)}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if gpus_per_task < 0:
        raise ValueError(f"gpus_per_task must be >= 0, got {gpus_per_task}")
    if executor == "local" and (ray_address or gpus_per_task):
        raise ValueError("ray_address and gpus_per_task apply to the ray executor; the local one takes devices")
    if executor == "ray" and devices:
        raise ValueError("devices apply to the local executor; give the ray executor gpus_per_task")
    if executor == "ray":
        import_ray()  # fail before anything runs
    runs_root = paths.runs_dir().resolve()
    root = runs_root / grid.notebook
    settings: list[GridSetting] = grid.settings()
    done = [s for s in settings if (root / s.setting_id / DONE).exists()]
    done_ids = {s.setting_id for s in done}
    foreign = [str(root / s.setting_id) for s in settings
               if s.setting_id not in done_ids and (root / s.setting_id).exists()]
    if foreign:
        raise ValueError(f"run folders exist without {DONE} (not written by a sweep); move them away first: "
                         + ", ".join(foreign))
    db = db if db is not None else ResultsDB()
    report = SweepReport(grid.notebook, failed_dir=root / FAILED_DIR)
    clean_partials(root)
    completed = db.completed(grid.notebook)
    for s in done:
        report.skipped.append(s.setting_id)
        if s.setting_id not in completed:  # killed between the rename and the database write
            record_folder(db, grid.notebook, root / s.setting_id)
            report.recovered.append(s.setting_id)

    forwarded = {k: v for k, v in os.environ.items() if k.startswith("BACKDOORLAB_") and k != RUN_DIR_ENV}
    tasks = [dict(notebook_path=str(Path(grid.notebook_path).resolve()), notebook=grid.notebook,
                  setting_id=s.setting_id, parameters=s.parameters, runs_root=str(runs_root), env=forwarded,
                  kernel_name=kernel_name)
             for s in settings if s.setting_id not in done_ids]
    if executor == "ray":
        results = run_ray(tasks, ray_address, workers, gpus_per_task)
    else:
        results = run_local(tasks, workers or max(1, len(devices)), devices)

    from tqdm.auto import tqdm

    with tqdm(total=len(settings), initial=len(done), desc=grid.notebook, unit="setting",
              disable=not _progress_enabled()) as bar:
        for result in results:
            record_result(db, grid.notebook, result)
            if result["status"] == "ok":
                report.ok.append(result["setting_id"])
            else:
                report.failed[result["setting_id"]] = result["error"]
            bar.update(1)
    return report
