"""Training throughput: `train.fit` against a conventional BackdoorBench-style pipeline,
in the same process, on the same data, model, recipe, seed and initial weights.

Conventional (``conventional.py``): a torch ``Dataset`` that poisons per sample in
``__getitem__`` (uint8, like BackdoorBench's poisoned PNGs), torchvision CPU transforms on
PIL images, DataLoader workers, fp32, ``loss.item()`` every step.
Ours: ``train.fit`` (uint8 data resident on the device, batched poisoning and
augmentation, bf16 + channels_last on CUDA, one host sync per epoch).

    python benchmarks/train_throughput.py                              # mnist5k, width 16, CPU
    python benchmarks/train_throughput.py --data synthetic-cifar --width 64 --device cuda --epochs 3

Both paths first share a one-epoch warm-up on a 2,048-image subset (CUDA context, cuDNN
plans, the allocator); then each trains a fresh copy of the same initial weights. Prints
images/s for both, their ratio, the projected seconds per 100-epoch model, the training
FLOP/s achieved (counted by ``torch.utils.flop_counter`` on one step) and, on a GPU whose
dense bf16 peak is known, the fraction of it.

Accuracy guard: the per-epoch training loss of both paths side by side, and the largest
gap between them beside the gap between two seeds of ours (a noise reference: the two
paths draw different data orders and augmentations, so "the same within noise" means the
cross-path gap is of the seed-to-seed size). ``--no-noise-reference`` skips the second seed.

Writes runs/benchmarks/train_throughput.json.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from backdoorlab import attacks, data, models, paths, runs
from backdoorlab.train import Recipe, fit, resolve_device
from conventional import conventional_fit, default_workers

# dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from the vendors' data sheets
BF16_PEAK = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
             "L40S": 362e12, "L4": 121e12}


def bf16_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK.items() if key in name), None)


def training_flops_per_image(model: torch.nn.Module, shape: tuple[int, ...], device: torch.device) -> float:
    """Forward + backward FLOPs of one training image, counted on a batch of 8."""
    probe = models.clone(model).to(device).train()
    x = torch.rand(8, *shape, device=device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(probe(x), torch.zeros(8, dtype=torch.int64, device=device)).backward()
    return counter.get_total_flops() / 8


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="mnist5k", choices=["mnist5k", "synthetic-cifar"])
    p.add_argument("--n", type=int, default=50_000, help="synthetic-cifar training images")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=default_workers(), help="conventional DataLoader workers")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-noise-reference", action="store_true", help="skip ours with a second seed")
    args = p.parse_args()
    device = resolve_device(args.device)
    bundle = data.load("mnist5k") if args.data == "mnist5k" else data.synthetic_cifar(args.n)
    bundle = bundle.to(device)
    attack = attacks.create("badnets")
    poison = attack.poison_indices(bundle.train_y.cpu(), 0.1, seed=0)
    recipe = Recipe(epochs=args.epochs, batch_size=args.batch_size)
    torch.manual_seed(0)
    initial = models.for_bundle("preactresnet18", bundle, args.width)
    n = len(bundle.train_y)

    warm = bundle.subset(torch.arange(min(n, 2048)))
    fit(models.clone(initial), warm, Recipe(epochs=1, batch_size=args.batch_size), progress=False)
    conv = conventional_fit(models.clone(initial), bundle, recipe, attack, poison, seed=0, workers=args.workers)
    ours = fit(models.clone(initial), bundle, recipe, attack, poison, seed=0, progress=False)
    ours_seed1 = None if args.no_noise_reference else fit(models.clone(initial), bundle, recipe, attack, poison,
                                                          seed=1, progress=False)
    conv_rate, ours_rate = recipe.epochs * n / conv.seconds, recipe.epochs * n / ours.seconds
    flops = training_flops_per_image(initial, bundle.shape, device)
    peak = bf16_peak(device)
    cross_gap = max(abs(a - b) for a, b in zip(conv.loss, ours.loss))
    seed_gap = None if ours_seed1 is None else max(abs(a - b) for a, b in zip(ours_seed1.loss, ours.loss))

    result = {"data": args.data, "n": n, "width": args.width, "epochs": args.epochs, "batch_size": args.batch_size,
              "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "cpu", "threads": torch.get_num_threads(), "workers": args.workers,
              "conventional_images_per_s": conv_rate, "ours_images_per_s": ours_rate, "ratio": ours_rate / conv_rate,
              "projected_s_per_100_epochs": {"conventional": 100 * n / conv_rate, "ours": 100 * n / ours_rate},
              "training_flops_per_image": flops, "ours_flops_per_s": flops * ours_rate,
              "bf16_peak_flops_per_s": peak, "fraction_of_peak": None if peak is None else flops * ours_rate / peak,
              "loss": {"conventional": conv.loss, "ours": ours.loss,
                       "ours_seed1": None if ours_seed1 is None else ours_seed1.loss},
              "max_loss_gap": {"conventional_vs_ours": cross_gap, "ours_seed0_vs_seed1": seed_gap},
              "environment": runs.environment(device)}
    print(f"{args.data} ({n} images) preactresnet18 w{args.width} batch {args.batch_size}, {args.epochs} epochs, "
          f"on {result['device_name']} (torch {torch.__version__}, {torch.get_num_threads()} threads):")
    print(f"  conventional (per-sample Dataset, {args.workers} workers, fp32, .item() per step): "
          f"{conv_rate:9.0f} images/s, {100 * n / conv_rate:8.0f} s per 100 epochs")
    print(f"  backdoorlab train.fit:                                                "
          f"{ours_rate:9.0f} images/s, {100 * n / ours_rate:8.0f} s per 100 epochs")
    print(f"  ratio: {ours_rate / conv_rate:.2f}x")
    print(f"  training FLOPs per image {flops / 1e9:.3f} G; ours achieves {flops * ours_rate / 1e12:.3f} TFLOP/s"
          + ("" if peak is None else f" = {flops * ours_rate / peak:.1%} of the {peak / 1e12:.0f} TFLOP/s bf16 peak"))
    print("  training loss per epoch  conventional: " + " ".join(f"{v:.4f}" for v in conv.loss))
    print("                           ours:         " + " ".join(f"{v:.4f}" for v in ours.loss))
    if ours_seed1 is not None:
        print("                           ours seed 1:  " + " ".join(f"{v:.4f}" for v in ours_seed1.loss))
        print(f"  largest per-epoch loss gap: conventional vs ours {cross_gap:.4f}; ours seed 0 vs 1 {seed_gap:.4f}")
    runs.write_json(paths.runs_dir() / "benchmarks" / "train_throughput.json", result)


if __name__ == "__main__":
    main()
