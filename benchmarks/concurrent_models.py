"""Many models at once: a grid's small training jobs run one at a time, or K at a time as
worker processes that share one device, measured as aggregate models per hour.

K workers on one device is what the local sweep executor does with
``backdoorlab sweep NOTEBOOK --grid G --workers K --devices 0`` (on a CPU, ``--workers K``):
on a CPU each worker gets ``cores // K`` threads (``sweep.execute.thread_share``), on CUDA
the workers share the GPU and hide each other's Python and launch overhead.

Each job trains PreAct-ResNet18 with BadNets (pratio 0.1) under its own seed (a grid's seeds)
through ``train.fit``, then measures clean ACC and ASR. Every concurrency level runs the same
jobs, and each job's ACC/ASR (and their mean) is compared with the one-at-a-time run of the
same seed: concurrency may change only the speed. With ``--threads`` fixed, every level gives the same
models bit for bit; by default a worker's thread count falls as workers rise, and a different
thread count changes the order of floating-point sums, which a few epochs amplify. Worker
processes start, import torch, load the data and run a short warm-up before the clock starts,
as a sweep pays that once per grid, not once per model.

    python benchmarks/concurrent_models.py                  # mnist5k, `smoke` jobs (width 8, 4 epochs, 2,000 images)
    python benchmarks/concurrent_models.py --scale default --models 8 --concurrency 2,4,8 --device cuda
    python benchmarks/concurrent_models.py --data synthetic-cifar --scale paper --epochs 2 --models 16 \\
        --concurrency 2,4,8 --device cuda

Writes runs/benchmarks/concurrent_models.json.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from typing import Any

import torch

from backdoorlab import attacks, data, metrics, models, paths, runs, scales
from backdoorlab.sweep.execute import thread_share
from backdoorlab.train import Recipe, fit, resolve_device

_WORKER: dict[str, Any] = {}  # a worker process's data and job description, set by _start_worker


def load_bundle(spec: dict[str, Any]) -> data.TensorBundle:
    if spec["data"] == "synthetic-cifar":
        bundle = data.synthetic_cifar(spec["n"] or 50_000)
    else:
        bundle = data.load("mnist5k")
        if spec["n"]:
            bundle = bundle.subset(torch.arange(min(spec["n"], len(bundle.train_y))))
    return bundle.to(resolve_device(spec["device"]))


def _start_worker(spec: dict[str, Any], threads: int, ready: Any) -> None:
    """Pool initializer: threads, data on the device, a warm-up step; then wait for the others."""
    torch.set_num_threads(threads)
    bundle = load_bundle(spec)
    _WORKER.update(spec=spec, bundle=bundle)
    warm = bundle.subset(torch.arange(min(len(bundle.train_y), 2 * spec["batch_size"])))
    fit(models.for_bundle("preactresnet18", warm, spec["width"]), warm,
        Recipe(epochs=1, batch_size=spec["batch_size"]), progress=False)
    ready.wait()


def train_job(seed: int) -> dict[str, Any]:
    """One grid job: a BadNets model under ``seed``, trained and evaluated."""
    spec, bundle = _WORKER["spec"], _WORKER["bundle"]
    attack = attacks.create("badnets")
    poison = attack.poison_indices(bundle.train_y.cpu(), 0.1, seed=seed)
    torch.manual_seed(seed)
    model = models.for_bundle("preactresnet18", bundle, spec["width"])
    history = fit(model, bundle, Recipe(epochs=spec["epochs"], batch_size=spec["batch_size"]), attack, poison,
                  seed=seed, progress=False)
    scores = metrics.evaluate(model, bundle, attack)
    return {"seed": seed, "fit_s": history.seconds, "loss": history.loss, "acc": scores["acc"], "asr": scores["asr"],
            "pid": os.getpid()}


def run_level(spec: dict[str, Any], workers: int, seeds: list[int], threads: int | None = None) -> dict[str, Any]:
    """Every job on a pool of ``workers`` processes, each with ``threads`` CPU threads (default: the sweep's
    share on a CPU, 1 beside a GPU); the wall time from the first job to the last."""
    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(workers + 1)
    if threads is None:
        threads = thread_share(workers) if resolve_device(spec["device"]).type == "cpu" else 1
    pool = context.Pool(workers, initializer=_start_worker, initargs=(spec, threads, ready))
    try:
        ready.wait(timeout=600)
        start = time.perf_counter()
        jobs = sorted(pool.imap_unordered(train_job, seeds, chunksize=1), key=lambda job: job["seed"])
        wall = time.perf_counter() - start
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
    return {"workers": workers, "threads_per_worker": threads, "wall_s": wall,
            "mean_acc": sum(job["acc"] for job in jobs) / len(jobs), "mean_asr": sum(job["asr"] for job in jobs) / len(jobs),
            "models_per_hour": 3600 * len(seeds) / wall, "processes_used": len({job["pid"] for job in jobs}),
            "jobs": jobs}


def parse_levels(text: str) -> list[int]:
    try:
        levels = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        levels = []
    if not levels or levels[0] < 1:
        raise SystemExit(f"--concurrency takes comma-separated worker counts >= 1, e.g. 1,2,4; got {text!r}")
    return levels if levels[0] == 1 else [1, *levels]  # one at a time is the reference


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="mnist5k", choices=["mnist5k", "synthetic-cifar"])
    p.add_argument("--scale", default="smoke", choices=list(scales.SCALES),
                   help="a job's width, epochs, batch size and training images (flags below override)")
    p.add_argument("--n", type=int, default=None, help="training images (synthetic-cifar: 50,000 unless the scale "
                   "limits it; mnist5k: the first N)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--models", type=int, default=4, help="jobs (seeds 0..models-1) per concurrency level")
    p.add_argument("--concurrency", default="1,2", help="worker counts to measure (1 is always included)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per worker at every level (default: cores // workers on a CPU, as the sweep "
                        "gives; 1 beside a GPU). The same count everywhere makes every level's models identical")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    levels = parse_levels(args.concurrency)
    if args.models < 1:
        raise SystemExit(f"--models must be >= 1, got {args.models}")
    device = resolve_device(args.device)
    scale = scales.SCALES[args.scale]
    spec = {"data": args.data, "n": args.n or scale.train_limit, "width": args.width or scale.width,
            "epochs": args.epochs or scale.epochs, "batch_size": args.batch_size or scale.batch_size,
            "device": str(device), "scale": args.scale}
    seeds = list(range(args.models))
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    results = [run_level(spec, workers, seeds, args.threads) for workers in levels]
    reference = {job["seed"]: job for job in results[0]["jobs"]}
    for level in results:
        level["speedup"] = level["models_per_hour"] / results[0]["models_per_hour"]
        level["max_abs_diff_vs_one_at_a_time"] = {
            key: max(abs(job[key] - reference[job["seed"]][key]) for job in level["jobs"]) for key in ("acc", "asr")}
        level["max_abs_diff_vs_one_at_a_time"]["loss"] = max(
            abs(a - b) for job in level["jobs"] for a, b in zip(job["loss"], reference[job["seed"]]["loss"]))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"{args.models} jobs at {args.scale} scale: {args.data} ({spec['n'] or 'all'} images), preactresnet18 "
          f"w{spec['width']}, BadNets 10 %, {spec['epochs']} epochs, batch {spec['batch_size']}, on {name} "
          f"(torch {torch.__version__})")
    print(f"  {'workers':>7} {'threads':>7} {'wall s':>8} {'models/h':>9} {'speedup':>8} "
          f"{'mean ACC':>8} {'mean ASR':>8} {'max |dACC|':>10} {'max |dASR|':>10} {'max |dloss|':>11}")
    for level in results:
        diff = level["max_abs_diff_vs_one_at_a_time"]
        print(f"  {level['workers']:>7} {level['threads_per_worker']:>7} {level['wall_s']:>8.1f} "
              f"{level['models_per_hour']:>9.0f} {level['speedup']:>7.2f}x {level['mean_acc']:>8.3f} {level['mean_asr']:>8.3f} "
              f"{diff['acc']:>10.3f} {diff['asr']:>10.3f} "
              f"{diff['loss']:>11.4f}")
    print("  per job (one at a time): " + ", ".join(f"seed {j['seed']} ACC {j['acc']:.3f} ASR {j['asr']:.3f}"
                                                    for j in results[0]["jobs"]))
    runs.write_json(paths.runs_dir() / "benchmarks" / "concurrent_models.json",
                    {**spec, "models": args.models, "levels": results, "device_name": name,
                     "environment": runs.environment(device)})


if __name__ == "__main__":
    main()
