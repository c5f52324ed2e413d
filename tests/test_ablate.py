"""emo ablate end to end on a tiny cache: the default grid, seeds, resuming and its errors."""

import csv
import json
import shutil
from pathlib import Path

import h5py
import pytest
from click.testing import CliRunner

from emo.cli import main
from emo.errors import CacheError, RunError
from emo.heads.ablate import AblateConfig, ablate
from emo.heads.grid import DEFAULT_GRID

METRIC_COLUMNS = ("test_accuracy_mean", "test_macro_recall_mean", "val_accuracy_mean", "val_macro_recall_mean")
SMALL_GRID = """
[defaults]
epochs = 2
stack_epochs = 1

[[configs]]
stages = "L4"

[[configs]]
stages = "L3,L4"
stacking = "logreg"
"""


def read_records(out: Path) -> dict[tuple[str, int], dict]:
    lines = (out / "results.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    return {(record["name"], record["seed"]): record for record in records}


def numbers(record: dict) -> tuple[float, ...]:
    return (record["test"]["accuracy"], record["test"]["macro_recall"], record["val"]["accuracy"],
            record["val"]["macro_recall"])


@pytest.fixture(scope="module")
def ab_default_ablation(ab_cache, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("ab_ablation") / "seeds01"
    return out, ablate(AblateConfig(cache=ab_cache, out=out, seeds=(0, 1)))


@pytest.fixture
def ab_grid_file(tmp_path) -> Path:
    path = tmp_path / "grid.toml"
    path.write_text(SMALL_GRID, encoding="utf-8")
    return path


def test_default_grid_one_row_per_configuration(ab_default_ablation):
    out, rows = ab_default_ablation

    assert len(rows) == len(DEFAULT_GRID)
    assert all(row["seeds"] == 2 for row in rows)
    assert len((out / "results.jsonl").read_text().splitlines()) == 2 * len(DEFAULT_GRID)


def test_default_grid_numbers_in_unit_interval(ab_default_ablation):
    _, rows = ab_default_ablation

    for row in rows:
        for column in METRIC_COLUMNS:
            assert 0.0 <= row[column] <= 1.0, (row["name"], column)
        assert row["seconds_mean"] > 0.0


def test_default_grid_tables_written(ab_default_ablation):
    out, rows = ab_default_ablation
    markdown = (out / "ablation.md").read_text(encoding="utf-8")
    with open(out / "ablation.csv", newline="", encoding="utf-8") as file:
        table = list(csv.DictReader(file))

    assert len([line for line in markdown.splitlines() if line.startswith("| `")]) == len(rows)
    assert [row["name"] for row in table] == [row["name"] for row in rows]
    assert float(table[0]["test_accuracy_mean"]) == pytest.approx(rows[0]["test_accuracy_mean"])


def test_default_grid_runs_are_run_directories(ab_default_ablation):
    out, rows = ab_default_ablation

    for row in rows:
        for seed in (0, 1):
            run = out / "runs" / row["name"] / f"seed{seed}"
            assert (run / "metrics.json").is_file()
            assert not (run / "INCOMPLETE").exists()


def test_seeds_change_numbers(ab_default_ablation):
    out, rows = ab_default_ablation
    records = read_records(out)

    changed = [row["name"] for row in rows if numbers(records[row["name"], 0]) != numbers(records[row["name"], 1])]
    assert changed


def test_same_seed_repeats_exactly(ab_default_ablation, ab_cache, tmp_path):
    out, rows = ab_default_ablation
    # One worker runs in this process; the numbers must match those of the worker processes.
    ablate(AblateConfig(cache=ab_cache, out=tmp_path / "again", seeds=(1,), workers=1))
    first, again = read_records(out), read_records(tmp_path / "again")

    for row in rows:
        assert numbers(again[row["name"], 1]) == numbers(first[row["name"], 1]), row["name"]


def test_rerun_resumes_without_repeating(ab_default_ablation, ab_cache):
    out, rows = ab_default_ablation
    before = (out / "results.jsonl").read_text()

    again = ablate(AblateConfig(cache=ab_cache, out=out, seeds=(0, 1)))

    assert (out / "results.jsonl").read_text() == before
    assert again == rows


def test_interrupted_ablation_runs_only_missing(ab_cache, ab_grid_file, tmp_path):
    out = tmp_path / "ablation"
    ablate(AblateConfig(cache=ab_cache, out=out, seeds=(0, 1), grid=str(ab_grid_file), workers=1))
    lines = (out / "results.jsonl").read_text().splitlines()
    # Keep three finished runs and a line cut off mid-write, as a killed process leaves them.
    (out / "results.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])

    rows = ablate(AblateConfig(cache=ab_cache, out=out, seeds=(0, 1), grid=str(ab_grid_file), workers=1))

    assert len(read_records(out)) == 4
    assert [row["seeds"] for row in rows] == [2, 2]
    assert sorted(numbers(r) for r in read_records(out).values()) == sorted(numbers(json.loads(line)) for line in lines)


def test_fewer_seeds_use_subset_of_results(ab_cache, ab_grid_file, tmp_path):
    out = tmp_path / "ablation"
    ablate(AblateConfig(cache=ab_cache, out=out, seeds=(0, 1), grid=str(ab_grid_file), workers=1))

    rows = ablate(AblateConfig(cache=ab_cache, out=out, seeds=(1,), grid=str(ab_grid_file), workers=1))

    assert [row["seeds"] for row in rows] == [1, 1]
    assert rows[0]["test_accuracy_std"] == 0.0


def test_other_cache_rejected_unless_overwrite(ab_cache, ab_grid_file, tmp_path):
    out = tmp_path / "ablation"
    ablate(AblateConfig(cache=ab_cache, out=out, seeds=(0,), grid=str(ab_grid_file), workers=1))
    settings = json.loads((out / "config.json").read_text())
    settings["cache_fingerprint"] = "another"
    (out / "config.json").write_text(json.dumps(settings))

    with pytest.raises(RunError, match="contains results of another cache"):
        ablate(AblateConfig(cache=ab_cache, out=out, seeds=(0,), grid=str(ab_grid_file), workers=1))
    ablate(AblateConfig(cache=ab_cache, out=out, seeds=(0,), grid=str(ab_grid_file), workers=1, overwrite=True))
    assert len(read_records(out)) == 2


def test_foreign_config_json_rejected(ab_cache, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"kind": "heads"}))

    with pytest.raises(RunError, match="contains a config.json that emo ablate did not write"):
        ablate(AblateConfig(cache=ab_cache, out=out, seeds=(0,)))


def test_invalid_config_json_rejected(ab_cache, tmp_path):
    out = tmp_path / "ablation"
    out.mkdir()
    (out / "config.json").write_text("{")

    with pytest.raises(RunError, match="config.json is not valid JSON"):
        ablate(AblateConfig(cache=ab_cache, out=out, seeds=(0,)))


def test_cache_without_grid_stage_rejected(ab_cache, tmp_path):
    cache = tmp_path / "no-l0.h5"
    shutil.copy(ab_cache, cache)
    with h5py.File(cache, "r+") as file:
        stages = json.loads(file.attrs["stages"])
        del stages["L0"]
        file.attrs["stages"] = json.dumps(stages)

    with pytest.raises(CacheError, match="has no stage L0, which the grid uses"):
        ablate(AblateConfig(cache=cache, out=tmp_path / "ablation", seeds=(0,)))


@pytest.mark.parametrize("options, message", [
    ({"seeds": ()}, "seeds must list at least one seed"),
    ({"seeds": (0, -1)}, "seeds must be 0 or more"),
    ({"seeds": (1, 1)}, "repeat a seed"),
    ({"workers": -1}, "workers must be 0"),
])
def test_config_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        AblateConfig(cache=Path("c.h5"), out=Path("o"), **options)


def test_cli_ablate_prints_table(ab_cache, ab_grid_file, tmp_path):
    result = CliRunner().invoke(main, ["ablate", str(ab_cache), "--out", str(tmp_path / "ablation"), "--seeds", "0",
                                       "--grid", str(ab_grid_file), "--workers", "1"])

    assert result.exit_code == 0, result.output
    assert "| `L4_weighted_lr0.001_drop0_e2_se1` | 1 |" in result.output
    assert (tmp_path / "ablation" / "ablation.md").is_file()


@pytest.mark.parametrize("seeds, message", [("0,a", "is not a comma-separated list of integers"),
                                            (",", "lists no seed")])
def test_cli_ablate_rejects_bad_seeds(ab_cache, tmp_path, seeds, message):
    result = CliRunner().invoke(main, ["ablate", str(ab_cache), "--out", str(tmp_path / "a"), "--seeds", seeds])

    assert result.exit_code == 2
    assert message in result.output


def test_cli_ablate_reports_grid_error(ab_cache, tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text("[[configs]]\nlearning_rate = 0.1\n")

    result = CliRunner().invoke(main, ["ablate", str(ab_cache), "--out", str(tmp_path / "a"), "--grid", str(grid)])

    assert result.exit_code == 1
    assert "unknown key 'learning_rate'" in result.output
