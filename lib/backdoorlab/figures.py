"""Figures shared by the notebooks (matplotlib / seaborn; no state kept here)."""
from __future__ import annotations

from typing import Any, Mapping

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


# Looking inside a backdoored model (numbers from backdoorlab.inspection) -------------------------------------------


def _check_panels(panels: Mapping[str, Any]) -> None:
    if not isinstance(panels, Mapping) or not panels:
        raise ValueError("give a non-empty mapping {panel name: data}, one entry per panel")


def tsne_scatter(frames: Mapping[str, Any], title: str = ""):
    """One panel per model (``{name: inspection.tsne_embedding(...)}``): clean points coloured
    by class, poisoned points as black crosses."""
    import matplotlib.pyplot as plt

    _check_panels(frames)
    fig, axes = plt.subplots(1, len(frames), figsize=(4.2 * len(frames), 3.9), squeeze=False)
    classes = sorted(set().union(*(set(f.loc[f.group == "clean", "label"]) for f in frames.values())))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for ax, (name, frame) in zip(axes[0], frames.items()):
        clean, poisoned = frame[frame.group == "clean"], frame[frame.group == "poisoned"]
        for i, c in enumerate(classes):
            part = clean[clean.label == c]
            ax.scatter(part.x, part.y, s=9, color=cmap(i % cmap.N), alpha=0.75, linewidths=0,
                       label=f"class {c}" if len(classes) <= 20 else None)
        ax.scatter(poisoned.x, poisoned.y, s=16, marker="x", color="black", linewidths=0.8, label="poisoned")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, -1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False,
                       ncol=1 if len(classes) <= 10 else 2)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def grad_cam_grid(rows: Mapping[str, "tuple[torch.Tensor, torch.Tensor]"], n: int = 6, alpha: float = 0.5):
    """One row per ``{name: (images, heat maps)}`` (``inspection.grad_cam``): the first ``n``
    images with their Grad-CAM map overlaid (jet; red = where the prediction looks)."""
    import matplotlib.pyplot as plt

    _check_panels(rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.25 * n, 1.3 * len(rows)), squeeze=False)
    for r, (name, (images, maps)) in enumerate(rows.items()):
        for i in range(n):
            ax = axes[r, i]
            ax.axis("off")
            if i >= len(images):
                continue
            img = images[i].detach().float().cpu()
            img = img / 255 if images.dtype == torch.uint8 else img
            if img.shape[0] == 3:
                ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())
            else:
                ax.imshow(img.mean(0).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.imshow(maps[i].detach().float().cpu().numpy(), cmap="jet", vmin=0, vmax=1, alpha=alpha)
        axes[r, 0].text(-0.08, 0.5, name, transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    return fig


def neuron_activation_plot(frames: Mapping[str, Any], title: str = ""):
    """One panel per model (``{name: inspection.neuron_activation(...)}``): mean activation of
    every channel on clean and on poisoned inputs, channels sorted by the difference (left:
    the channels the trigger drives most)."""
    import matplotlib.pyplot as plt

    _check_panels(frames)
    fig, axes = plt.subplots(1, len(frames), figsize=(4.2 * len(frames), 2.8), squeeze=False, sharey=True)
    for ax, (name, frame) in zip(axes[0], frames.items()):
        ax.plot(frame["rank"], frame["clean"], color="tab:blue", lw=1.2, label="clean inputs")
        ax.plot(frame["rank"], frame["backdoor"], color="tab:red", lw=1.2, label="poisoned inputs")
        ax.fill_between(frame["rank"], frame["clean"], frame["backdoor"], color="tab:red", alpha=0.15)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("channel, by backdoor - clean activation")
    axes[0, 0].set_ylabel("mean activation")
    axes[0, 0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def loss_landscape_plot(frame, title: str = "", value: str = "loss", log: bool | None = None):
    """Loss (or ``value="accuracy"``) around the trained weights, from a tidy frame of
    ``inspection.loss_landscape`` rows with optional ``model`` and ``inputs`` columns.
    1-D (``alpha`` only): one panel per model, one line per inputs. 2-D (``alpha``, ``beta``):
    a contour map per model (rows) and inputs (columns); the cross marks the trained weights.
    ``log`` (default: for the loss) draws the value on a log scale, so the region near the
    trained weights stays readable next to the large losses far from them."""
    import matplotlib.pyplot as plt
    import numpy as np

    if value not in ("loss", "accuracy") or "alpha" not in frame:
        raise ValueError(f"need a loss_landscape frame (alpha, [beta,] loss, accuracy) and value 'loss' or 'accuracy', "
                         f"got value {value!r} and columns {list(frame.columns)}")
    log = value == "loss" if log is None else log
    frame = frame.copy()
    for column, default in (("model", "model"), ("inputs", "inputs")):
        if column not in frame:
            frame[column] = default
    model_names, input_names = list(dict.fromkeys(frame.model)), list(dict.fromkeys(frame.inputs))
    if "beta" not in frame:
        fig, axes = plt.subplots(1, len(model_names), figsize=(3.8 * len(model_names), 2.9), squeeze=False, sharey=True)
        for ax, name in zip(axes[0], model_names):
            for inputs in input_names:
                part = frame[(frame.model == name) & (frame.inputs == inputs)].sort_values("alpha")
                ax.plot(part.alpha, part[value], marker=".", lw=1.2, label=inputs)
            ax.axvline(0, color="gray", lw=0.6, ls=":")
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("step along a filter-normalised direction")
            if log:
                ax.set_yscale("log")
        axes[0, 0].set_ylabel(value)
        axes[0, 0].legend(fontsize=7)
    else:
        fig, axes = plt.subplots(len(model_names), len(input_names),
                                 figsize=(3.4 * len(input_names), 3.0 * len(model_names)), squeeze=False)
        for r, name in enumerate(model_names):
            for c, inputs in enumerate(input_names):
                grid = frame[(frame.model == name) & (frame.inputs == inputs)].pivot_table(
                    index="beta", columns="alpha", values=value)
                ax = axes[r, c]
                values = np.log10(np.clip(grid.values, 1e-12, None)) if log else grid.values
                filled = ax.contourf(grid.columns, grid.index, values, levels=12, cmap="viridis")
                ax.contour(grid.columns, grid.index, values, levels=12, colors="white", linewidths=0.4)
                ax.plot(0, 0, "w+", ms=8)
                fig.colorbar(filled, ax=ax, label=f"log10 {value}" if log else value)
                ax.set_title(f"{name}: {inputs}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def confusion_matrix_plot(matrices: Mapping[str, torch.Tensor], title: str = "", columns: int = 2):
    """A heat map per ``{name: inspection.confusion_matrix(...)}`` (rows: true class,
    columns: predicted), coloured by the share of each row and annotated with counts
    where there are at most 12 classes."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    _check_panels(matrices)
    columns = min(columns, len(matrices))
    rows = -(-len(matrices) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(matrices):]:
        ax.axis("off")
    for ax, (name, counts) in zip(axes.flat, matrices.items()):
        counts = counts.detach().cpu()
        share = counts.double() / counts.sum(1, keepdim=True).clamp_min(1)
        small = counts.shape[0] <= 12
        sns.heatmap(share.numpy(), vmin=0, vmax=1, cmap="Blues", annot=counts.numpy() if small else False, fmt="d",
                    annot_kws={"fontsize": 6}, cbar=False, square=True, ax=ax)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
