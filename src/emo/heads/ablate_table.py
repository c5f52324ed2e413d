"""The summary table of ``emo ablate``: mean and standard deviation over seeds, as Markdown and CSV."""

import csv
from pathlib import Path

import numpy as np

METRICS = (("test", "accuracy"), ("test", "macro_recall"), ("val", "accuracy"), ("val", "macro_recall"))
MARKDOWN_FILE = "ablation.md"
CSV_FILE = "ablation.csv"

NOTES = (
    "Mean ± sample standard deviation (ddof=1) over seeds; a single seed has standard deviation 0. "
    "Val numbers are those of each final model on the val split, which also chose the best epochs. "
    "The logreg stacking is fit on the val split, so its val numbers are in-sample. Seconds are the "
    "wall time of one fit-heads run (one seed), with several runs in parallel processes. A "
    "configuration name lists: stages (L1-L4 = L1 to L4), the combination of several stages "
    "(stack-weighted, stack-mean, stack-logreg or concat), sampling, learning rate, dropout and epochs."
)


def summarize(names: list[str], seeds: tuple[int, ...], records: dict[tuple[str, int], dict]) -> list[dict]:
    """Return one row per configuration with mean and standard deviation over the seeds that finished.

    Args:
        names: configuration names, in table order.
        seeds: the seeds of this ablation; records of other seeds are ignored.
        records: ``results.jsonl`` records keyed by (name, seed).

    Returns:
        Rows with ``name``, ``seeds`` (how many finished), ``<split>_<metric>_mean`` /
        ``_std`` for test and val accuracy and macro recall, ``seconds_mean`` and ``seconds_total``.
        A configuration without any finished seed has NaN numbers.

    Example:
        >>> summarize(["L4"], (0,), {("L4", 0): {"test": {"accuracy": 0.5, "macro_recall": 0.4},
        ...     "val": {"accuracy": 0.6, "macro_recall": 0.5}, "seconds": 2.0}})[0]["test_accuracy_mean"]
        0.5
    """
    rows = []
    for name in names:
        finished = [records[name, seed] for seed in seeds if (name, seed) in records]
        row = {"name": name, "seeds": len(finished)}
        for split, metric in METRICS:
            values = np.array([record[split][metric] for record in finished], dtype=float)
            row[f"{split}_{metric}_mean"], row[f"{split}_{metric}_std"] = _mean_std(values)
        seconds = np.array([record["seconds"] for record in finished], dtype=float)
        row["seconds_mean"] = float(seconds.mean()) if len(seconds) else float("nan")
        row["seconds_total"] = float(seconds.sum())
        rows.append(row)
    return rows


def format_markdown(rows: list[dict]) -> str:
    """Format summary rows as a Markdown table (numbers as mean ± standard deviation)."""
    header = ["configuration", "seeds", "test accuracy", "test macro recall", "val accuracy", "val macro recall",
              "seconds per seed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        cells = [f"`{row['name']}`", str(row["seeds"])]
        cells += [_format_pair(row[f"{split}_{metric}_mean"], row[f"{split}_{metric}_std"])
                  for split, metric in METRICS]
        cells.append("-" if np.isnan(row["seconds_mean"]) else f"{row['seconds_mean']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_tables(out: Path, rows: list[dict]) -> tuple[Path, Path]:
    """Write ``ablation.md`` (table and notes) and ``ablation.csv`` into ``out``; return their paths."""
    markdown = out / MARKDOWN_FILE
    temporary = markdown.with_name(markdown.name + ".tmp")
    temporary.write_text(f"# Head ablation\n\n{format_markdown(rows)}\n\n{NOTES}\n", encoding="utf-8")
    temporary.replace(markdown)

    table = out / CSV_FILE
    temporary = table.with_name(table.name + ".tmp")
    with open(temporary, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    temporary.replace(table)
    return markdown, table


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    if len(values) == 0:
        return float("nan"), float("nan")
    std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return float(values.mean()), std


def _format_pair(mean: float, std: float) -> str:
    return "-" if np.isnan(mean) else f"{mean:.3f} ± {std:.3f}"
