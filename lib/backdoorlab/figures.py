"""Figures shared by the notebooks (matplotlib / seaborn; no state kept here)."""
from __future__ import annotations

from typing import Mapping

import torch

from .attacks.base import Attack


def _show(ax, img: torch.Tensor) -> None:
    img = img.detach().permute(1, 2, 0).float().cpu().clamp(0, 1)
    ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])


def trigger_gallery(attacks: Mapping[str, Attack], images: torch.Tensor, amplify: float = 5.0):
    """One row per attack: for each image, the poisoned image and the residual
    (poisoned - clean) amplified ``amplify`` times around grey; a first row of clean images."""
    import matplotlib.pyplot as plt

    n = len(images)
    fig, axes = plt.subplots(1 + len(attacks), 2 * n, figsize=(1.3 * 2 * n, 1.35 * (1 + len(attacks))), squeeze=False)
    for c in range(2 * n):
        axes[0, c].axis("off")
    for i in range(n):
        _show(axes[0, 2 * i], images[i])
        axes[0, 2 * i].axis("on")
        axes[0, 2 * i].set_title("clean", fontsize=7)
    axes[0, 0].set_ylabel("clean", rotation=0, ha="right", va="center", fontsize=8)
    for r, (name, attack) in enumerate(attacks.items(), start=1):
        poisoned = attack.apply(images)
        residual = ((poisoned - images) * amplify + 0.5).clamp(0, 1)
        for i in range(n):
            _show(axes[r, 2 * i], poisoned[i])
            _show(axes[r, 2 * i + 1], residual[i])
            if r == 1:
                axes[r, 2 * i].set_title("poisoned", fontsize=7)
                axes[r, 2 * i + 1].set_title(f"residual x{amplify:g}", fontsize=7)
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    return fig


def der_heatmap(table, title: str = "", value: str = "der"):
    """DER (or another column) for every attack (rows) x defense (columns) of a metrics
    table with ``attack``/``defense`` columns; 0.5 (no change) to 1 (backdoor gone at no
    accuracy cost). Returns the figure."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    grid = table.pivot_table(index="attack", columns="defense", values=value)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * grid.shape[1], 1.0 + 0.35 * grid.shape[0]))
    sns.heatmap(grid, annot=grid.shape[1] <= 24, fmt=".2f", vmin=0.5 if value == "der" else 0.0, vmax=1.0,
                cmap="viridis", cbar_kws={"label": value.upper()}, ax=ax, annot_kws={"fontsize": 7})
    ax.set_title(title or f"{value.upper()} per attack and defense")
    return fig
