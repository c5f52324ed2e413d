"""``emo report``: compare finished runs of any kind in one table with figures.

The table follows the layout of Table V of Najid & Chahyati (EECSI 2018): method, accuracy,
macro recall, per-class recall and minutes per epoch, all of the test split. Every run
directory in the layout of :mod:`emo.runs` works, head runs and fine-tuned runs alike.
"""

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emo import runs
from emo.errors import RunError
from emo.evaluate.metrics import format_number
from emo.evaluate.plots import plot_confusion_matrix, plot_per_class_recall

logger = logging.getLogger(__name__)

REPORT_FILE = "report.md"
RECALL_FIGURE = "per_class_recall.png"
_PRIMARY_KEYS = ("accuracy", "macro_recall", "per_class_recall", "confusion_matrix")


@dataclass(frozen=True)
class ReportConfig:
    """Everything ``emo report`` needs; the CLI maps its arguments onto these fields."""

    runs: tuple[Path, ...]
    out: Path = Path("report")

    def __post_init__(self) -> None:
        if not self.runs:
            raise ValueError("give at least one run directory to report on")

    def to_json(self) -> dict:
        """Return the config as JSON-ready values."""
        return {"runs": [str(run) for run in self.runs], "out": str(self.out)}


@dataclass(frozen=True)
class RunSummary:
    """The test numbers of one run's primary model and where they come from."""

    method: str
    kind: str
    run_dir: Path
    model: str
    accuracy: float
    macro_recall: float
    per_class_recall: dict[str, float | None]
    confusion_matrix: list[list[int]]
    minutes_per_epoch: float | None


def write_report(config: ReportConfig) -> list[RunSummary]:
    """Write ``report.md``, one confusion-matrix PNG per run and a per-class recall chart into ``config.out``.

    Args:
        config: the run directories to compare and the output folder.

    Returns:
        One :class:`RunSummary` per run, in the order given.

    Raises:
        RunError: if a run is missing, incomplete, has no ``metrics.json``, or its classes differ
            from the first run's.

    Example:
        >>> write_report(ReportConfig(runs=(Path("runs/heads"), Path("runs/finetune"))))[0].accuracy  # doctest: +SKIP
        0.41
    """
    summaries, classes = _read_runs(config.runs)
    try:
        config.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunError(f"cannot create report folder {config.out}: {error}") from error

    figures = []
    for index, summary in enumerate(summaries):
        figure = f"confusion-{index + 1:02d}-{_slug(summary.method)}.png"
        plot_confusion_matrix(summary.confusion_matrix, classes, config.out / figure,
                              title=f"{summary.method} ({summary.model}, test)")
        figures.append(figure)
    plot_per_class_recall({s.method: s.per_class_recall for s in summaries}, classes, config.out / RECALL_FIGURE,
                          title="per-class recall on test")

    text = _markdown(summaries, classes, figures)
    (config.out / REPORT_FILE).write_text(text, encoding="utf-8")
    runs.write_json_atomically(config.out / "config.json", {"kind": "report", "config": config.to_json()})
    logger.info("report on %d runs written to %s", len(summaries), config.out / REPORT_FILE)
    return summaries


def format_table(summaries: list[RunSummary], classes: list[str]) -> str:
    """Format the run summaries as a Markdown table in the layout of Table V."""
    header = ["method", "accuracy", "macro recall", *classes, "minutes per epoch"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for summary in summaries:
        recalls = [format_number(summary.per_class_recall[name]) for name in classes]
        minutes = "-" if summary.minutes_per_epoch is None else f"{summary.minutes_per_epoch:.3g}"
        cells = [summary.method, format_number(summary.accuracy), format_number(summary.macro_recall), *recalls,
                 minutes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _read_runs(run_dirs: tuple[Path, ...]) -> tuple[list[RunSummary], list[str]]:
    summaries, classes, first = [], None, None
    methods = _unique_methods([Path(run_dir) for run_dir in run_dirs])
    for run_dir, method in zip(run_dirs, methods):
        run_dir = Path(run_dir)
        settings = runs.read_run_config(run_dir)
        if classes is None:
            classes, first = settings["classes"], run_dir
        elif settings["classes"] != classes:
            raise RunError(f"run {run_dir} has classes {settings['classes']}, but run {first} has {classes}; "
                           "a report compares runs on the same classes")
        summaries.append(_summarize_run(run_dir, settings, method))
    return summaries, classes


def _unique_methods(run_dirs: list[Path]) -> list[str]:
    """Return a table label per run: its name, with the folder added where two names are equal."""
    names = [_run_name(run_dir) for run_dir in run_dirs]
    labels = [name if names.count(name) == 1 else f"{name} ({run_dir.name})" for name, run_dir in zip(names, run_dirs)]
    return [label if labels.count(label) == 1 else str(run_dir) for label, run_dir in zip(labels, run_dirs)]


def _run_name(run_dir: Path) -> str:
    try:
        name = json.loads((run_dir / "config.json").read_text(encoding="utf-8")).get("name")
    except (OSError, json.JSONDecodeError, AttributeError):
        name = None  # read_run_config reports what is wrong with the run.
    return name if isinstance(name, str) and name else run_dir.name


def _summarize_run(run_dir: Path, settings: dict, method: str) -> RunSummary:
    metrics = _read_metrics(run_dir)
    primary = metrics["models"][metrics["primary"]]
    return RunSummary(method=method, kind=str(settings.get("kind")), run_dir=run_dir, model=metrics["primary"],
                      accuracy=primary["accuracy"], macro_recall=primary["macro_recall"],
                      per_class_recall=primary["per_class_recall"], confusion_matrix=primary["confusion_matrix"],
                      minutes_per_epoch=_minutes_per_epoch(run_dir / "history.jsonl"))


def _read_metrics(run_dir: Path) -> dict:
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise RunError(f"run {run_dir} has no metrics.json; evaluate it with `emo evaluate {run_dir}`")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
        primary = metrics["models"][metrics["primary"]]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise RunError(f"{path} is not an emo-vision metrics file ({error!r}); rerun `emo evaluate {run_dir}`") from error
    missing = [key for key in _PRIMARY_KEYS if key not in primary]
    if missing:
        raise RunError(f"{path} lacks {missing[0]!r} for model {metrics['primary']!r}; rerun `emo evaluate {run_dir}`")
    return metrics


def _minutes_per_epoch(path: Path) -> float | None:
    """Return the mean ``seconds`` of the epoch records in ``history.jsonl`` in minutes, or None without any."""
    if not path.is_file():
        return None
    seconds = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("seconds"), (int, float)):
            seconds.append(record["seconds"])
    return float(np.mean(seconds)) / 60.0 if seconds else None


def _markdown(summaries: list[RunSummary], classes: list[str], figures: list[str]) -> str:
    lines = ["# Run comparison", "", "Test split; macro recall is the mean of per-class recall. Minutes per epoch "
             "are the mean over every epoch in history.jsonl (for head runs: branch and stacking epochs).", "",
             format_table(summaries, classes), "", "## Runs", ""]
    lines += [f"- {s.method}: {s.kind} run `{s.run_dir}`, model `{s.model}`" for s in summaries]
    lines += ["", "## Per-class recall", "", f"![per-class recall]({RECALL_FIGURE})", "",
              "## Confusion matrices (rows normalized by true class)", ""]
    for summary, figure in zip(summaries, figures):
        lines += [f"![{summary.method}]({figure})", ""]
    return "\n".join(lines)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")[:80] or "run"
