"""Poisoning throughput of every registered attack: the batched kernel against a
conventional per-sample pipeline, in the same process, on the same images.

Conventional (BackdoorBench's way): a torch ``Dataset`` that holds uint8 HWC images and
poisons one image at a time in ``__getitem__`` (the attack's own kernel called on a
batch of one, on the same device, converted back to uint8 like a stored poisoned PNG,
then ``ToTensor``), iterated by a ``DataLoader`` with batch 128 and 0 workers.
Ours: ``attack.apply`` on uint8 batches of 512 turned into floats on the device (what
``train.fit`` and ``metrics.evaluate`` do), and ``attack.poison_batch`` with a 10 %
mask (what a training step does).

Every attack is first prepared on the data cut to the ``smoke`` scale (some train
material in ``prepare``); one that fails to validate, prepare or run is skipped with
its reason. Timings follow a warm-up, with ``torch.cuda.synchronize`` on CUDA; each is
the fastest of ``--repeats`` passes over the same ``--n`` images, for both pipelines.

    python benchmarks/attacks.py                                   # mnist5k, CPU or the GPU
    python benchmarks/attacks.py --data synthetic-cifar --device cuda --n 8192
    python benchmarks/attacks.py --threads 1      # a busy shared CPU: OpenMP threads that wait
                                                  # on each other make batched kernels look slow

Prints a table (attack, batched img/s, poison_batch img/s, per-sample img/s, ratio);
writes runs/benchmarks/attacks.json.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from backdoorlab import attacks, data, paths, runs, scales
from backdoorlab.data.bundle import TensorBundle, to_float
from backdoorlab.train import resolve_device

BATCH = 512  # batched kernel
LOADER_BATCH = 128  # conventional DataLoader


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class PerSamplePoisonedDataset(torch.utils.data.Dataset):
    """The conventional way: poison one image at a time when it is read."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, attack, device: torch.device):
        self.x = x.cpu().permute(0, 2, 3, 1).numpy()  # N, H, W, C uint8, as decoded PNGs
        self.y = y.cpu().numpy()
        self.attack, self.device = attack, device
        self.to_tensor = transforms.ToTensor()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        img = torch.from_numpy(self.x[i]).permute(2, 0, 1)[None].to(self.device).float() / 255
        poisoned = (self.attack.apply(img)[0] * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        pil = Image.fromarray(poisoned[..., 0] if poisoned.shape[-1] == 1 else poisoned)
        return self.to_tensor(pil), int(self.y[i])


def best_rate(run_pass, images: int, device: torch.device, repeats: int) -> float:
    """Images/s of the fastest of ``repeats`` timed passes (robust to a busy machine)."""
    best = 0.0
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        run_pass()
        sync(device)
        best = max(best, images / (time.perf_counter() - start))
    return best


def per_sample(attack, x: torch.Tensor, y: torch.Tensor, device: torch.device, repeats: int) -> float:
    dataset = PerSamplePoisonedDataset(x, y, attack, device)
    for i in range(min(8, len(dataset))):  # warm-up (caches, allocator)
        dataset[i]
    loader = torch.utils.data.DataLoader(dataset, batch_size=LOADER_BATCH, shuffle=False, num_workers=0)

    def run_pass() -> None:
        for _ in loader:
            pass

    return best_rate(run_pass, len(dataset), device, repeats)


def batched(fn, x: torch.Tensor, device: torch.device, repeats: int) -> float:
    """Images/s of ``fn(start, uint8 batch)`` over ``x`` in batches of ``BATCH``."""
    starts = range(0, len(x), BATCH)
    fn(starts[0], x[:BATCH])  # warm-up, a full and the last (maybe partial) batch
    fn(starts[-1], x[starts[-1]:])

    def run_pass() -> None:
        for s in starts:
            fn(s, x[s:s + BATCH])

    return best_rate(run_pass, len(x), device, repeats)


def measure(name: str, bundle: TensorBundle, smoke: TensorBundle, x: torch.Tensor, y: torch.Tensor,
            device: torch.device, repeats: int) -> dict:
    attack = attacks.create(name, **attacks.params_for(name, tuple(bundle.shape)))  # luma variant on grayscale
    attack.validate(bundle.num_classes, bundle.shape)
    start = time.perf_counter()
    attack.prepare(smoke, scale="smoke", seed=0, progress=False)
    prepare_s = time.perf_counter() - start
    mask = (torch.rand(len(x), generator=torch.Generator().manual_seed(0)) < 0.1).to(device)  # 10 % poisoned

    def poison(s: int, xb: torch.Tensor) -> torch.Tensor:
        return attack.poison_batch(to_float(xb), y[s:s + BATCH], mask[s:s + BATCH], bundle.num_classes)[0]

    with torch.no_grad():
        apply_rate = batched(lambda s, xb: attack.apply(to_float(xb)), x, device, repeats)
        poison_rate = batched(poison, x, device, repeats)
        sample_rate = per_sample(attack, x, y, device, repeats)
    return {"attack": name, "batched_images_per_s": apply_rate, "poison_batch_images_per_s": poison_rate,
            "per_sample_images_per_s": sample_rate, "ratio": apply_rate / sample_rate, "prepare_s": prepare_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--data", default="mnist5k", choices=["mnist5k", "synthetic-cifar"])
    p.add_argument("--n", type=int, default=2048, help="images poisoned per measurement")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per measurement; the fastest counts")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: torch's default); 1 is fairer on a shared, busy machine")
    p.add_argument("--attacks", nargs="*", default=None, help="a subset of attacks (default: every registered one)")
    args = p.parse_args()
    if args.n < 1 or args.repeats < 1:
        p.error("--n and --repeats must be >= 1")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    full = data.load("mnist5k", "cpu") if args.data == "mnist5k" else data.synthetic_cifar(50_000)
    preset = scales.get("smoke")
    smoke = full.subset(torch.arange(min(len(full.train_y), preset.train_limit)), preset.test_limit).to(device)
    idx = torch.arange(args.n) % len(full.train_y)
    x, y = full.train_x[idx].to(device), full.train_y[idx].to(device)
    names = args.attacks or attacks.names()
    unknown = sorted(set(names) - set(attacks.names()))
    if unknown:
        p.error(f"unknown attacks {unknown}; valid choices: {', '.join(attacks.names())}")

    rows, skipped = [], {}
    for name in names:
        try:
            rows.append(measure(name, full, smoke, x, y, device, args.repeats))
        except Exception as err:  # noqa: BLE001 - a broken attack must not stop the benchmark
            reason = f"{type(err).__name__}: {err}".splitlines()[0][:200]
            skipped[name] = reason
            print(f"  skipped {name}: {reason}", flush=True)
            continue
        r = rows[-1]
        print(f"  {name:<16} {r['batched_images_per_s']:>12.0f} {r['per_sample_images_per_s']:>10.0f} "
              f"{r['ratio']:>7.1f}x", flush=True)

    print(f"\n{args.data} {tuple(full.shape)}, {args.n} images, device {device}, {torch.get_num_threads()} threads")
    header = f"{'attack':<16} {'batched img/s':>14} {'poison_batch':>13} {'per-sample img/s':>17} {'ratio':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['attack']:<16} {r['batched_images_per_s']:>14.0f} {r['poison_batch_images_per_s']:>13.0f} "
              f"{r['per_sample_images_per_s']:>17.0f} {r['ratio']:>7.1f}x")
    for name, reason in skipped.items():
        print(f"{name:<16} skipped: {reason}")
    if rows:
        ratios = np.array([r["ratio"] for r in rows])
        print(f"geometric-mean ratio: {float(np.exp(np.log(ratios).mean())):.1f}x over {len(rows)} attacks")
    result = {"data": args.data, "n": args.n, "batch": BATCH, "loader_batch": LOADER_BATCH, "repeats": args.repeats,
              "device": str(device), "threads": torch.get_num_threads(), "rows": rows, "skipped": skipped,
              "environment": runs.environment(device)}
    path = runs.write_json(paths.runs_dir() / "benchmarks" / "attacks.json", result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
