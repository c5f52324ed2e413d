"""emo report: the Table V layout, one confusion matrix per run and the per-class recall chart."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from emo.cli import main
from emo.errors import RunError
from emo.evaluate.report import RECALL_FIGURE, REPORT_FILE, ReportConfig, write_report
from emo.heads import FitHeadsConfig, fit_heads

AB_CLASSES = ("calm", "fear", "joy")  # The classes of the ab_cache images (tests/conftest.py).


@pytest.fixture(scope="module")
def ab_head_run(ab_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ab_report") / "heads"
    fit_heads(FitHeadsConfig(cache=ab_cache, out=out, stages=("L3", "L4"), epochs=2, stack_epochs=1))
    return out


@pytest.fixture
def ab_finetune_run(ab_head_run, tmp_path) -> Path:
    """A run directory in the fine-tuned layout: kind "finetune" and two epochs of 90 and 150 s."""
    run = tmp_path / "finetune"
    shutil.copytree(ab_head_run, run)
    settings = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**settings, "kind": "finetune", "name": "resnet101-finetune"}))
    epochs = [{"epoch": 1, "loss": 1.5, "seconds": 90.0}, {"epoch": 2, "loss": 1.2, "seconds": 150.0}]
    (run / "history.jsonl").write_text("".join(json.dumps(record) + "\n" for record in epochs))
    return run


def table_rows(text: str) -> list[list[str]]:
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows]


def test_report_table_layout(ab_head_run, ab_finetune_run, tmp_path):
    write_report(ReportConfig(runs=(ab_head_run, ab_finetune_run), out=tmp_path / "report"))
    header, *rows = table_rows((tmp_path / "report" / REPORT_FILE).read_text(encoding="utf-8"))

    assert header == ["method", "accuracy", "macro recall", *AB_CLASSES, "minutes per epoch"]
    assert [row[0] for row in rows] == ["L3-L4_stack-weighted_weighted_lr0.001_drop0_e2_se1", "resnet101-finetune"]
    assert rows[1][-1] == "2"
    assert all(0.0 <= float(cell) <= 1.0 for row in rows for cell in row[1:-1])


def test_report_numbers_match_metrics(ab_head_run, tmp_path):
    summary = write_report(ReportConfig(runs=(ab_head_run,), out=tmp_path / "report"))[0]
    metrics = json.loads((ab_head_run / "metrics.json").read_text())

    assert summary.model == "stacked"
    assert summary.accuracy == metrics["models"]["stacked"]["accuracy"]
    assert summary.per_class_recall == metrics["models"]["stacked"]["per_class_recall"]
    assert summary.minutes_per_epoch > 0.0


def test_report_figures_have_expected_size(ab_head_run, ab_finetune_run, tmp_path):
    write_report(ReportConfig(runs=(ab_head_run, ab_finetune_run), out=tmp_path / "report"))
    confusions = sorted((tmp_path / "report").glob("confusion-*.png"))

    assert [path.name for path in confusions] == [
        "confusion-01-L3-L4_stack-weighted_weighted_lr0.001_drop0_e2_se1.png",
        "confusion-02-resnet101-finetune.png"]
    for path in confusions:
        with Image.open(path) as image:
            # Three classes: the 4 x 4 inch minimum at 100 dpi.
            assert image.size == (400, 400)
            assert len(np.unique(np.asarray(image.convert("L")))) > 10
    with Image.open(tmp_path / "report" / RECALL_FIGURE) as image:
        # 6 inches wide (three classes), 3.5 + 0.25 inch per run high.
        assert image.size == (600, 400)
        assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 10


def test_report_links_every_figure(ab_head_run, ab_finetune_run, tmp_path):
    write_report(ReportConfig(runs=(ab_head_run, ab_finetune_run), out=tmp_path / "report"))
    text = (tmp_path / "report" / REPORT_FILE).read_text(encoding="utf-8")

    for path in (tmp_path / "report").glob("*.png"):
        assert f"]({path.name})" in text


def test_report_labels_runs_with_equal_names(ab_head_run, tmp_path):
    copy = tmp_path / "seed1"
    shutil.copytree(ab_head_run, copy)

    summaries = write_report(ReportConfig(runs=(ab_head_run, copy), out=tmp_path / "report"))

    assert [s.method for s in summaries] == ["L3-L4_stack-weighted_weighted_lr0.001_drop0_e2_se1 (heads)",
                                             "L3-L4_stack-weighted_weighted_lr0.001_drop0_e2_se1 (seed1)"]


def test_report_without_history_shows_dash(ab_head_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ab_head_run, run)
    (run / "history.jsonl").unlink()

    summary = write_report(ReportConfig(runs=(run,), out=tmp_path / "report"))[0]

    assert summary.minutes_per_epoch is None
    assert table_rows((tmp_path / "report" / REPORT_FILE).read_text())[1][-1] == "-"


def test_report_rejects_other_classes(ab_head_run, tmp_path):
    run = tmp_path / "other"
    shutil.copytree(ab_head_run, run)
    (run / "classes.json").write_text(json.dumps(["a", "b", "c"]))

    with pytest.raises(RunError, match="has classes \\['a', 'b', 'c'\\], but run .* has"):
        write_report(ReportConfig(runs=(ab_head_run, run), out=tmp_path / "report"))


def test_report_rejects_incomplete_run(ab_head_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ab_head_run, run)
    (run / "INCOMPLETE").write_text("")

    with pytest.raises(RunError, match="is incomplete"):
        write_report(ReportConfig(runs=(run,), out=tmp_path / "report"))


def test_report_rejects_missing_metrics(ab_head_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ab_head_run, run)
    (run / "metrics.json").unlink()

    with pytest.raises(RunError, match="has no metrics.json; evaluate it"):
        write_report(ReportConfig(runs=(run,), out=tmp_path / "report"))


@pytest.mark.parametrize("content, message", [
    ("{", "is not an emo-vision metrics file"),
    (json.dumps({"primary": "stacked", "models": {}}), "is not an emo-vision metrics file"),
    (json.dumps({"primary": "L4", "models": {"L4": {"accuracy": 0.5}}}), "lacks 'macro_recall' for model 'L4'"),
])
def test_report_rejects_bad_metrics(ab_head_run, tmp_path, content, message):
    run = tmp_path / "run"
    shutil.copytree(ab_head_run, run)
    (run / "metrics.json").write_text(content)

    with pytest.raises(RunError, match=message):
        write_report(ReportConfig(runs=(run,), out=tmp_path / "report"))


def test_report_config_needs_runs():
    with pytest.raises(ValueError, match="at least one run directory"):
        ReportConfig(runs=())


def test_cli_report_prints_table(ab_head_run, ab_finetune_run, tmp_path):
    result = CliRunner().invoke(main, ["report", str(ab_head_run), str(ab_finetune_run), "--out",
                                       str(tmp_path / "report")])

    assert result.exit_code == 0, result.output
    assert "| resnet101-finetune |" in result.output
    assert (tmp_path / "report" / RECALL_FIGURE).is_file()


def test_cli_report_needs_run_dirs(tmp_path):
    result = CliRunner().invoke(main, ["report", "--out", str(tmp_path / "report")])

    assert result.exit_code == 2
    assert "Missing argument 'RUN_DIRS...'" in result.output


def test_cli_report_names_missing_run(tmp_path):
    result = CliRunner().invoke(main, ["report", str(tmp_path / "missing")])

    assert result.exit_code == 1
    assert "run directory" in result.output and "not found" in result.output
