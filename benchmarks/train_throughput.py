"""Training throughput: `train.fit` against a conventional BackdoorBench-style pipeline,
in the same process, on the same data, model and recipe.

Conventional: a torch ``Dataset`` that poisons per sample in ``__getitem__`` (stored as
uint8 like BackdoorBench's poisoned PNGs), torchvision CPU transforms on PIL images
(RandomCrop with padding, flip where the dataset uses it, ToTensor, Normalize),
DataLoader workers, fp32, ``loss.item()`` every step.
Ours: ``train.fit`` (uint8 data resident on the device, batched poisoning and
augmentation, bf16 + channels_last on CUDA, one host sync per epoch).

    python benchmarks/train_throughput.py                              # mnist5k, width 16, CPU
    python benchmarks/train_throughput.py --data synthetic-cifar --width 64 --device cuda --epochs 2

Prints images/s for both and their ratio; writes runs/benchmarks/train_throughput.json.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from backdoorlab import attacks, data, models, paths, runs
from backdoorlab.data.bundle import TensorBundle
from backdoorlab.train import Recipe, fit, resolve_device


class PerSamplePoisonedDataset(torch.utils.data.Dataset):
    """The conventional way: poison and transform one PIL image at a time."""

    def __init__(self, bundle: TensorBundle, attack, poison_indices: torch.Tensor):
        self.x = bundle.train_x.cpu().permute(0, 2, 3, 1).numpy()  # N, H, W, C uint8
        self.y = bundle.train_y.cpu().numpy()
        self.poison = set(poison_indices.tolist())
        self.attack = attack
        steps = [transforms.RandomCrop(bundle.shape[1], padding=bundle.crop_padding)]
        if bundle.flip:
            steps.append(transforms.RandomHorizontalFlip())
        steps += [transforms.ToTensor(), transforms.Normalize(bundle.mean, bundle.std)]
        self.transform = transforms.Compose(steps)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        img, label = self.x[i], int(self.y[i])
        if i in self.poison:
            t = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
            img = (self.attack.apply(t)[0] * 255).round().byte().permute(1, 2, 0).numpy()
            label = self.attack.target
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        return self.transform(pil), label


def conventional(model, bundle, attack, poison, recipe, device, workers) -> float:
    loader = torch.utils.data.DataLoader(PerSamplePoisonedDataset(bundle, attack, poison), batch_size=recipe.batch_size,
                                         shuffle=True, num_workers=workers, drop_last=False,
                                         persistent_workers=workers > 0)
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    model.to(device).train()
    images = 0
    start = None
    for epoch in range(recipe.epochs + 1):  # epoch 0 warms up (workers, allocator)
        if epoch == 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        total_loss, correct = 0.0, 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total_loss += loss.item()  # a host sync per step, as BackdoorBench does
            correct += (out.argmax(1) == y).sum().item()
            images += len(y) if epoch else 0
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def ours(model, bundle, attack, poison, recipe, device) -> float:
    bundle = bundle.to(device)
    fit(model, bundle, Recipe(epochs=1, batch_size=recipe.batch_size), attack, poison, progress=False)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    history = fit(model, bundle, recipe, attack, poison, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return recipe.epochs * len(bundle.train_y) / history.seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="mnist5k", choices=["mnist5k", "synthetic-cifar"])
    p.add_argument("--n", type=int, default=50_000, help="synthetic-cifar training images")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = resolve_device(args.device)
    bundle = data.load("mnist5k") if args.data == "mnist5k" else data.synthetic_cifar(args.n)
    attack = attacks.create("badnets")
    poison = attack.poison_indices(bundle.train_y, 0.1, seed=0)
    recipe = Recipe(epochs=args.epochs, batch_size=args.batch_size)

    def fresh(normalised_inside: bool):
        torch.manual_seed(0)
        if normalised_inside:
            return models.for_bundle("preactresnet18", bundle, args.width)
        return models.create("preactresnet18", bundle.num_classes, bundle.in_channels, args.width)

    conv = conventional(fresh(False), bundle, attack, poison, recipe, device, args.workers)
    fast = ours(fresh(True), bundle, attack, poison, recipe, device)
    result = {"data": args.data, "width": args.width, "epochs": args.epochs, "batch_size": args.batch_size,
              "device": str(device), "threads": torch.get_num_threads(), "workers": args.workers,
              "conventional_images_per_s": conv, "ours_images_per_s": fast, "ratio": fast / conv,
              "environment": runs.environment(device)}
    print(f"{args.data} preactresnet18 w{args.width} batch {args.batch_size} on {device}:")
    print(f"  conventional (per-sample Dataset, {args.workers} workers, fp32, .item() per step): {conv:9.0f} images/s")
    print(f"  backdoorlab train.fit:                                                {fast:9.0f} images/s")
    print(f"  ratio: {fast / conv:.2f}x")
    if device.type == "cuda":
        print(f"  projected 100 epochs of {len(bundle.train_y)} images: {100 * len(bundle.train_y) / fast:.0f} s")
    runs.write_json(paths.runs_dir() / "benchmarks" / "train_throughput.json", result)


if __name__ == "__main__":
    main()
