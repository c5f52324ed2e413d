"""Classification metrics in the form every run stores them.

``macro_recall`` is the paper's "avg-recall": the mean of per-class recall over the classes
present in the evaluated split.
"""

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, recall_score


def compute_metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """Compute accuracy, macro recall, per-class recall and the confusion matrix.

    Args:
        y_true: true class indices.
        y_pred: predicted class indices.
        classes: class names in index order.

    Returns:
        ``{"accuracy", "macro_recall", "per_class_recall", "confusion_matrix", "classes", "count"}``.
        The confusion matrix has one row per true class, in class-index order. A class absent from
        ``y_true`` has recall None.

    Example:
        >>> compute_metrics(np.array([0, 1, 1]), np.array([0, 1, 0]), ["a", "b"])["macro_recall"]
        0.75
    """
    labels = list(range(len(classes)))
    matrix = confusion_matrix(y_true, y_pred, labels=labels)
    present = sorted(set(np.asarray(y_true).tolist()))
    recalls = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    per_class = {name: (float(recalls[i]) if i in present else None) for i, name in enumerate(classes)}
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_recall": float(recall_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "per_class_recall": per_class,
        "confusion_matrix": matrix.tolist(),
        "classes": list(classes),
        "count": int(len(y_true)),
    }


def format_table(models: dict[str, dict]) -> str:
    """Format the metrics of several models as a plain-text table, one row per model."""
    first = next(iter(models.values()))
    classes = first["classes"]
    header = ["model", "accuracy", "macro_recall", *classes]
    rows = [header]
    for name, metrics in models.items():
        recalls = [format_number(metrics["per_class_recall"][c]) for c in classes]
        rows.append([name, format_number(metrics["accuracy"]), format_number(metrics["macro_recall"]), *recalls])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows)


def format_number(value: float | None) -> str:
    """Format a metric with four decimals, or ``-`` for None (a class absent from the split)."""
    return "-" if value is None else f"{value:.4f}"
