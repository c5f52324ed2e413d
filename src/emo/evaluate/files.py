"""Writing evaluation results into a run directory."""

from pathlib import Path

from emo import runs
from emo.evaluate.plots import plot_confusion_matrix


def write_metrics(run_dir: Path, metrics: dict, *, split: str, title: str) -> None:
    """Write ``metrics.json`` and ``confusion_matrix.png`` (suffixed with the split unless it is test)."""
    suffix = "" if split == "test" else f"-{split}"
    metrics = {"split": split, **metrics}
    runs.write_json_atomically(run_dir / f"metrics{suffix}.json", metrics)
    primary = metrics["models"][metrics["primary"]]
    plot_confusion_matrix(primary["confusion_matrix"], primary["classes"], run_dir / f"confusion_matrix{suffix}.png",
                          title=f"{title} ({metrics['primary']}, {split})")
