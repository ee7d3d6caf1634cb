"""Seconds per defense: each defense's own code run twice on the same backdoored model and
clean subset, once on backdoorlab's data path and once on the conventional one
(``conventional.py``: per-sample ``Dataset`` + PIL transforms + ``DataLoader`` workers, fp32,
a host sync every step, evaluation in batches of 128), in the same process.

The defenses that dominate a BackdoorBench grid's cost are the default: FT, ANP, SAU, NPD,
TSBD. Their training goes through ``train.fit`` (FT, SAU, NPD, TSBD) or ``tools.batches``
(ANP's mask search), and their model selection through ``train.predict``; the conventional
run swaps exactly those three for their conventional versions, so the two runs differ in how
data reach the model and nothing else. ACC/ASR of both outputs are printed as a check that
both runs did the same job (they draw different batches, so they agree only roughly).

    python benchmarks/defense_throughput.py                                  # mnist5k, smoke scale, CPU
    python benchmarks/defense_throughput.py --data synthetic-cifar --width 64 --scale paper --device cuda

The backdoored model: PreAct-ResNet18 trained with BadNets (pratio 0.1) by ``train.fit`` for
``--attack-epochs``. The clean subset: 5 % of the training set (BackdoorBench's default).
Writes runs/benchmarks/defense_throughput.json.
"""
from __future__ import annotations

import argparse
import time

import torch

from backdoorlab import attacks, data, defenses, metrics, models, paths, runs, scales
from backdoorlab.train import Recipe, fit, resolve_device
from conventional import CALLS, conventional_pipeline, default_workers

DOMINANT = ["ft", "anp", "sau", "npd", "tsbd"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_purify(name: str, model, clean, scale: str, seed: int) -> tuple[torch.nn.Module, float]:
    defense = defenses.create(name)
    synchronize(clean.device)
    start = time.perf_counter()
    purified = defense.purify(model, clean, scale=scale, seed=seed, progress=False)
    synchronize(clean.device)
    return purified, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="mnist5k", choices=["mnist5k", "synthetic-cifar"])
    p.add_argument("--n", type=int, default=50_000, help="synthetic-cifar training images")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--scale", default="smoke", choices=list(scales.SCALES), help="the defenses' epochs and batch sizes")
    p.add_argument("--defenses", default=",".join(DOMINANT), help=f"comma-separated; valid: {', '.join(defenses.names())}")
    p.add_argument("--attack-epochs", type=int, default=5)
    p.add_argument("--workers", type=int, default=default_workers(), help="conventional DataLoader workers")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    names = [d.strip().lower() for d in args.defenses.split(",") if d.strip()]
    unknown = [d for d in names if d not in defenses.names()]
    if unknown or not names:
        p.error(f"unknown defenses {unknown}; valid choices: {', '.join(defenses.names())}")
    device = resolve_device(args.device)
    bundle = (data.load("mnist5k") if args.data == "mnist5k" else data.synthetic_cifar(args.n)).to(device)
    attack = attacks.create("badnets")
    poison = attack.poison_indices(bundle.train_y.cpu(), 0.1, seed=0)
    torch.manual_seed(0)
    model = models.for_bundle("preactresnet18", bundle, args.width)
    fit(model, bundle, Recipe(epochs=args.attack_epochs), attack, poison, progress=False)
    before = metrics.evaluate(model, bundle, attack)
    clean = bundle.subset(data.clean_subset(bundle, 0.05, seed=0))
    timed_purify("ft", model, clean.subset(torch.arange(min(256, len(clean.train_y)))), "smoke", 0)  # warm-up

    rows = []
    for name in names:
        ours_model, ours_s = timed_purify(name, model, clean, args.scale, 0)
        CALLS.clear()
        with conventional_pipeline(workers=args.workers):
            conv_model, conv_s = timed_purify(name, model, clean, args.scale, 0)
        calls = dict(CALLS)
        if not calls:
            raise RuntimeError(f"{name} never reached the conventional data path; the comparison would be void")
        rows.append({"defense": name, "ours_s": ours_s, "conventional_s": conv_s, "ratio": conv_s / ours_s,
                     "ours": metrics.evaluate(ours_model, bundle, attack),
                     "conventional": metrics.evaluate(conv_model, bundle, attack), "conventional_calls": calls})

    result = {"data": args.data, "n_clean": len(clean.train_y), "width": args.width, "scale": args.scale,
              "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "cpu", "threads": torch.get_num_threads(), "workers": args.workers, "attacked": before,
              "defenses": rows, "environment": runs.environment(device)}
    print(f"{args.data}: {len(clean.train_y)} clean images, preactresnet18 w{args.width}, scale {args.scale}, on "
          f"{result['device_name']} (torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.workers} loader workers)")
    print(f"attacked model: ACC {before['acc']:.3f} ASR {before['asr']:.3f}")
    print(f"{'defense':8} {'ours s':>8} {'conv. s':>8} {'ratio':>7}   {'ours ACC/ASR':>13}   {'conv. ACC/ASR':>13}")
    for r in rows:
        print(f"{r['defense']:8} {r['ours_s']:8.2f} {r['conventional_s']:8.2f} {r['ratio']:6.2f}x   "
              f"{r['ours']['acc']:.3f} / {r['ours']['asr']:.3f}   "
              f"{r['conventional']['acc']:.3f} / {r['conventional']['asr']:.3f}")
    runs.write_json(paths.runs_dir() / "benchmarks" / "defense_throughput.json", result)


if __name__ == "__main__":
    main()
