"""Figures: the confusion matrix normalized by true class, and per-class recall across runs."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # Runs write PNG files; no display is needed or assumed.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_confusion_matrix(matrix: list[list[int]], classes: list[str], path: Path, *, title: str) -> None:
    """Save a confusion matrix, each row divided by its true-class count, as a PNG.

    Args:
        matrix: counts with rows = true class and columns = predicted class.
        classes: class names in index order, shown on both axes.
        path: the PNG file to write.
        title: the figure title.
    """
    counts = np.asarray(matrix, dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    normalized = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)

    size = max(4.0, 0.6 * len(classes) + 2.0)
    figure, axes = plt.subplots(figsize=(size, size), dpi=100)
    image = axes.imshow(normalized, vmin=0.0, vmax=1.0, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    _annotate_cells(axes, normalized)

    axes.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axes.set_yticks(range(len(classes)), classes)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _annotate_cells(axes, normalized: np.ndarray) -> None:
    for row in range(normalized.shape[0]):
        for column in range(normalized.shape[1]):
            value = normalized[row, column]
            axes.text(column, row, f"{value:.2f}", ha="center", va="center",
                      color="white" if value > 0.5 else "black", fontsize=8)


def plot_per_class_recall(recalls: dict[str, dict[str, float | None]], classes: list[str], path: Path, *,
                          title: str) -> None:
    """Save a grouped bar chart of per-class recall, one bar per run in each class group, as a PNG.

    The figure is ``max(6, 1.2 * len(classes))`` inches wide and ``3.5 + 0.25 * len(recalls)`` high at
    100 dpi. The legend lists one run per line below the bars, because run names are long.

    Args:
        recalls: run label -> {class name: recall, or None when the class is absent from its test split}.
        classes: class names in index order, one group of bars each.
        path: the PNG file to write.
        title: the figure title.

    Example:
        >>> plot_per_class_recall({"L4": {"joy": 0.5, "fear": 0.25}}, ["joy", "fear"], Path("r.png"),
        ...                       title="test recall")  # doctest: +SKIP
    """
    size = (max(6.0, 1.2 * len(classes)), 3.5 + 0.25 * len(recalls))
    figure, axes = plt.subplots(figsize=size, dpi=100, layout="constrained")
    positions = np.arange(len(classes))
    width = 0.8 / len(recalls)
    for index, (label, values) in enumerate(recalls.items()):
        # An absent class (None) becomes NaN, which matplotlib leaves out instead of drawing a zero bar.
        heights = [np.nan if values[name] is None else values[name] for name in classes]
        axes.bar(positions - 0.4 + width * (index + 0.5), heights, width, label=label)

    axes.set_xticks(positions, classes, rotation=30, ha="right")
    axes.set_ylim(0.0, 1.0)
    axes.set_ylabel("recall")
    axes.set_title(title)
    figure.legend(loc="outside lower center", ncols=1, fontsize=8)
    figure.savefig(path)
    plt.close(figure)
