"""Matplotlib figures shared by training, evaluation and the notebook."""

from __future__ import annotations

from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # figures are rendered to files and TensorBoard, never to a screen

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def confusion_matrix_figure(
    confusion: np.ndarray,
    class_names: Sequence[str],
    title: str = "Confusion matrix (row-normalised)",
    show_counts: bool = False,
) -> Figure:
    """Counts -> a heatmap normalised per true class, with the class names on both axes.

    show_counts: write the raw count under each fraction (evaluation reports, where support is small).
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    rows = confusion.sum(axis=1, keepdims=True)
    normalised = np.divide(confusion, rows, out=np.zeros_like(confusion), where=rows > 0)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * n, 0.8 + 0.8 * n), dpi=100)
    image = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(n):
        for j in range(n):
            value = normalised[i, j]
            text = f"{value:.2f}\n({int(confusion[i, j])})" if show_counts else f"{value:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7 if show_counts else 8,
                    color="white" if value > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def probabilities_figure(probabilities: dict[str, float], title: str = "") -> Figure:
    """Horizontal bars of one face's class probabilities, the top class highlighted."""
    names, values = list(probabilities), [float(v) for v in probabilities.values()]
    top = int(np.argmax(values)) if values else -1
    fig, ax = plt.subplots(figsize=(4.0, 0.35 * len(names) + 0.9), dpi=100)
    colors = ["tab:orange" if i == top else "tab:blue" for i in range(len(names))]
    ax.barh(range(len(names)), values, color=colors)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()  # first class on top, in the model's order
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability")
    for i, value in enumerate(values):
        ax.text(min(value + 0.02, 0.86), i, f"{100 * value:.1f}%", va="center", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
