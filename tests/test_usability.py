"""Findings of a new-user test of the pipeline: each test reproduces one finding on real files."""

import csv
import json
import shutil
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner

from emo.backbone import build_resnet
from emo.cache.reader import FeatureCache
from emo.cache.schema import split_csv_path
from emo.cli import main
from emo.errors import CacheError, DataError, RunError, TrainingError, WeightsError
from emo.evaluate.run import evaluate_run
from emo.extract import extract
from emo.heads import FitHeadsConfig, fit_heads
from tests.conftest import tiny_extract_config


def invoke(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def partial_of(cache: Path) -> Path:
    return cache.with_name(cache.name + ".partial")


def edited_split_file(tiny_cache: Path, out: Path, edit) -> Path:
    """Copy the split file of ``tiny_cache`` to ``out`` with ``edit`` applied to each row dict."""
    with open(split_csv_path(tiny_cache), newline="") as file:
        rows = list(csv.DictReader(file))
    rows = [edited for row in rows if (edited := edit(dict(row))) is not None]
    with open(out, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["path", "label", "split", "sha256"])
        writer.writeheader()
        writer.writerows(rows)
    return out


# --split-file ----------------------------------------------------------------------------------

def move_split(source: str, target: str):
    return lambda row: {**row, "split": target if row["split"] == source else row["split"]}


def replace_first_sha256(row: dict) -> dict:
    return {**row, "sha256": "0" * 64} if row["path"] == "calm/000.jpg" else row


@pytest.mark.parametrize("edit, message", [
    (move_split("val", "train"), "no image of class 'calm' in the val split"),
    (move_split("test", "train"), "no image of class 'calm' in the test split"),
    (replace_first_sha256, "calm/000.jpg has SHA-256"),
])
def test_split_file_checked_before_forward_passes(image_folder, tiny_cache, tmp_path, edit, message):
    split_file = edited_split_file(tiny_cache, tmp_path / "split.csv", edit)
    out = tmp_path / "c.h5"
    with pytest.raises(DataError, match=message):
        extract(tiny_extract_config(image_folder, out, split_file=split_file))
    assert not partial_of(out).exists()


def test_split_file_row_for_missing_file_named(image_folder, tiny_cache, tmp_path):
    split_file = edited_split_file(tiny_cache, tmp_path / "split.csv", lambda row: row)
    with open(split_file, "a") as file:
        file.write("joy/not-there.jpg,joy,train,\n")
    with pytest.raises(DataError, match="line 62: 'joy/not-there.jpg' does not exist"):
        extract(tiny_extract_config(image_folder, tmp_path / "c.h5", split_file=split_file))


# evaluate checks the cache against the run ---------------------------------------------------------

@pytest.fixture(scope="module")
def matched_run(image_folder, tmp_path_factory) -> tuple[Path, Path]:
    """A cache of ``image_folder`` and a short head run on it (read-only for tests)."""
    folder = tmp_path_factory.mktemp("matched")
    cache = extract(tiny_extract_config(image_folder, folder / "c.h5")).cache
    run = folder / "run"
    fit_heads(FitHeadsConfig(cache=cache, out=run, epochs=2, stack_epochs=1, stages=("L3", "L4")))
    return cache, run


def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


@pytest.mark.parametrize("changes, named", [
    ({"image_size": 40}, "image size 40 instead of 32"),
    ({"seed": 9}, "weights random initialisation, seed 9"),
])
def test_evaluate_rejects_cache_of_other_backbone(matched_run, image_folder, tmp_path, changes, named):
    _, run = matched_run
    other = extract(tiny_extract_config(image_folder, tmp_path / "other.h5", **changes)).cache
    run = copy_run(run, tmp_path)
    with pytest.raises(CacheError) as error:
        evaluate_run(run, cache=other)
    assert f"cache {other} does not match run {run}" in str(error.value)
    assert named in str(error.value)


def test_evaluate_rejects_cache_of_other_arch(matched_run, tmp_path):
    cache, run = matched_run
    run = copy_run(run, tmp_path)
    settings = json.loads((run / "config.json").read_text())
    settings["backbone"]["arch"] = "resnet34"  # the same stage widths as resnet18, so the heads still load
    (run / "config.json").write_text(json.dumps(settings))
    with pytest.raises(CacheError, match="differs in arch resnet18 instead of resnet34"):
        evaluate_run(run, cache=cache)


def test_evaluate_rejects_cache_with_other_split(matched_run, image_folder, tmp_path):
    cache, run = matched_run
    swapped = {}

    def swap_one_train_and_test(row):
        # Move one image of class calm from test to train and one from train to test.
        if row["label"] == "calm" and row["split"] in ("train", "test") and row["split"] not in swapped:
            swapped[row["split"]] = row["path"]
            return {**row, "split": "test" if row["split"] == "train" else "train"}
        return row

    split_file = edited_split_file(cache, tmp_path / "split.csv", swap_one_train_and_test)
    other = extract(tiny_extract_config(image_folder, tmp_path / "other.h5", split_file=split_file)).cache
    with pytest.raises(CacheError, match="differs in split assignment"):
        evaluate_run(copy_run(run, tmp_path), cache=other)


def test_evaluate_overwritten_cache_leaves_metrics(matched_run, image_folder, tmp_path):
    cache, run = matched_run
    run = copy_run(run, tmp_path)
    own = Path(shutil.copy(cache, tmp_path / "own.h5"))
    settings = json.loads((run / "config.json").read_text())
    settings["config"]["cache"] = str(own)
    (run / "config.json").write_text(json.dumps(settings))
    before = (run / "metrics.json").read_bytes()
    extract(tiny_extract_config(image_folder, own, image_size=40, seed=9, overwrite=True))
    result = invoke("evaluate", run)
    assert result.exit_code == 1
    assert "differs in image size 40 instead of 32" in result.output
    assert (run / "metrics.json").read_bytes() == before


def test_evaluate_accepts_identical_reextraction(matched_run, image_folder, tmp_path):
    cache, run = matched_run
    again = extract(tiny_extract_config(image_folder, tmp_path / "again.h5", batch_size=5, dtype="float16")).cache
    recorded = json.loads((run / "metrics.json").read_text())
    metrics = evaluate_run(copy_run(run, tmp_path), cache=again)
    stacked = recorded["primary"]
    assert metrics["models"][stacked]["accuracy"] == pytest.approx(recorded["models"][stacked]["accuracy"])


def test_run_records_cache_fingerprint_and_split(matched_run):
    cache, run = matched_run
    settings = json.loads((run / "config.json").read_text())
    with FeatureCache(cache) as features:
        assert settings["cache"]["fingerprint"] == features.attrs["fingerprint"]
        assert settings["cache"]["split_sha256"] == features.split_sha256()
    assert settings["cache"]["path"] == str(cache.resolve())


# Runs work from any folder ----------------------------------------------------------------------

def test_relative_paths_recorded_absolute(image_folder, tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "w").mkdir(parents=True)
    model, _ = build_resnet("resnet18", "random", seed=3)
    torch.save(model.state_dict(), work / "w" / "tmpw.pt")
    monkeypatch.chdir(work)
    extract(tiny_extract_config(image_folder, Path("c.h5"), weights="w/tmpw.pt"))
    fit_heads(FitHeadsConfig(cache=Path("c.h5"), out=Path("runs/r1"), epochs=1, stack_epochs=0, stages=("L4",)))
    monkeypatch.chdir(tmp_path)
    settings = json.loads((work / "runs" / "r1" / "config.json").read_text())
    assert settings["config"]["cache"] == str(work / "c.h5")
    assert settings["backbone"]["weights"]["spec"] == str(work / "w" / "tmpw.pt")
    assert invoke("evaluate", work / "runs" / "r1").exit_code == 0
    result = invoke("predict", work / "runs" / "r1", image_folder / "joy" / "000.jpg")
    assert result.exit_code == 0, result.output


def test_missing_run_cache_says_pass_cache(matched_run, tmp_path):
    _, run = matched_run
    run = copy_run(run, tmp_path)
    settings = json.loads((run / "config.json").read_text())
    settings["config"]["cache"] = str(tmp_path / "moved.h5")
    (run / "config.json").write_text(json.dumps(settings))
    result = invoke("evaluate", run)
    assert result.exit_code == 1
    assert f"the run's cache {tmp_path / 'moved.h5'}" in result.output
    assert "pass --cache" in result.output


def test_missing_run_weights_says_pass_weights(matched_run, image_folder, tmp_path):
    _, run = matched_run
    run = copy_run(run, tmp_path)
    settings = json.loads((run / "config.json").read_text())
    settings["backbone"]["weights"]["spec"] = str(tmp_path / "moved.pt")
    (run / "config.json").write_text(json.dumps(settings))
    result = invoke("predict", run, image_folder / "joy" / "000.jpg")
    assert result.exit_code == 1
    assert f"the run's backbone weights {tmp_path / 'moved.pt'}" in result.output
    assert "pass --weights" in result.output


# Diverging training ------------------------------------------------------------------------------

def test_overflowing_step_stops_training(tiny_cache, tmp_path):
    # One batch per epoch and one epoch: the only step overflows the parameters, and no later
    # loss can turn NaN to reveal it.
    out = tmp_path / "run"
    config = FitHeadsConfig(cache=tiny_cache, out=out, stages=("L4",), epochs=1, stack_epochs=0, batch_size=64,
                            lr=3.4e38)
    with pytest.raises(TrainingError) as error:
        fit_heads(config)
    assert "became NaN or infinite in epoch 1 of branch training" in str(error.value)
    assert "Lower --lr (now 3.4e+38)" in str(error.value)
    assert not out.exists()


def test_nonfinite_model_never_written(tmp_path):
    from emo.heads.model import StackedHeads
    from emo.heads.train import require_finite_parameters

    model = StackedHeads({"L4": 4}, 3)
    with torch.no_grad():
        next(model.parameters())[0] = float("inf")
    config = FitHeadsConfig(cache=tmp_path / "c.h5", out=tmp_path / "run")
    with pytest.raises(TrainingError, match="became NaN or infinite after training"):
        require_finite_parameters(model, config, when="after training")


# fit-heads --out and evaluate on an unwritable run ------------------------------------------------

def test_out_with_other_files_rejected_before_training(tiny_cache, image_folder, tmp_path, monkeypatch):
    victim = Path(shutil.copytree(image_folder, tmp_path / "victim"))
    monkeypatch.setattr("emo.heads.train.FeatureCache", _fail_if_called)
    with pytest.raises(RunError) as error:
        fit_heads(FitHeadsConfig(cache=tiny_cache, out=victim, epochs=1, overwrite=True))
    assert f"--out {victim} is a folder with other files and not an emo-vision run" in str(error.value)
    assert "choose an empty or new folder" in str(error.value)
    assert sorted(path.name for path in victim.iterdir()) == ["calm", "fear", "joy"]


def _fail_if_called(*args, **kwargs):
    raise AssertionError("training started before --out was checked")


def test_empty_out_folder_accepted(tiny_cache, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    fit_heads(FitHeadsConfig(cache=tiny_cache, out=out, stages=("L4",), epochs=1, stack_epochs=0))
    assert (out / "metrics.json").is_file()


def test_overwrite_removes_stale_split_metrics(matched_run, tiny_cache, tmp_path):
    _, run = matched_run
    run = copy_run(run, tmp_path)
    evaluate_run(run, split="val")
    assert (run / "metrics-val.json").is_file()
    fit_heads(FitHeadsConfig(cache=tiny_cache, out=run, stages=("L4",), epochs=1, stack_epochs=0, overwrite=True))
    assert not (run / "metrics-val.json").exists()
    assert not (run / "confusion_matrix-val.png").exists()
    assert (run / "metrics.json").is_file()


def test_evaluate_unwritable_run_is_run_error(matched_run, tmp_path):
    _, run = matched_run
    run = copy_run(run, tmp_path)
    # A directory where the temporary file must go makes the write fail as a read-only folder would.
    (run / "metrics-val.json.tmp").mkdir()
    result = invoke("evaluate", run, "--split", "val")
    assert result.exit_code == 1
    assert f"cannot write the val metrics into run {run}" in result.output
    assert "Traceback" not in result.output


# Paths of the wrong kind ---------------------------------------------------------------------------

def test_evaluate_on_a_cache_file(tiny_cache):
    result = invoke("evaluate", tiny_cache)
    assert result.exit_code == 1
    assert f"{tiny_cache} is a file, not a run directory" in result.output
    assert "--cache" in result.output


def test_fit_heads_on_an_image_folder(image_folder, tmp_path):
    result = invoke("fit-heads", image_folder, "--out", tmp_path / "run")
    assert result.exit_code == 1
    assert f"{image_folder} is a folder, not a feature cache" in result.output
    assert f"emo extract {image_folder} --out FILE.h5" in result.output


# extract: float16 overflow, then float32; Ctrl-C ---------------------------------------------------

def overflowing_weights(path: Path) -> Path:
    model, _ = build_resnet("resnet18", "random")
    state = model.state_dict()
    state["layer4.1.bn2.weight"] *= 1e7  # pushes the L4 outputs past float16's maximum, 65504
    torch.save(state, path)
    return path


def test_float32_rerun_after_float16_overflow(image_folder, tmp_path):
    weights = overflowing_weights(tmp_path / "big.pt")
    out = tmp_path / "big.h5"
    with pytest.raises(CacheError, match="pass --dtype float32"):
        extract(tiny_extract_config(image_folder, out, weights=str(weights), dtype="float16"))
    assert partial_of(out).exists()
    summary = extract(tiny_extract_config(image_folder, out, weights=str(weights), dtype="float32"))
    assert summary.written_now == 60


def test_partial_with_rows_still_protected(image_folder, tmp_path, monkeypatch):
    from emo.cache import writer as cache_writer

    out = tmp_path / "c.h5"
    real_write = cache_writer.CacheWriter.write

    def write_once_then_interrupt(self, rows, pooled):
        real_write(self, rows, pooled)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(cache_writer.CacheWriter, "write", write_once_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            extract(tiny_extract_config(image_folder, out))
    with pytest.raises(CacheError, match="started by a different command"):
        extract(tiny_extract_config(image_folder, out, image_size=40))


def test_interrupt_says_rerun_resumes(image_folder, tmp_path, monkeypatch, caplog):
    from emo.cache import writer as cache_writer

    def interrupt(self, rows, pooled):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_writer.CacheWriter, "write", interrupt)
    out = tmp_path / "c.h5"
    with pytest.raises(KeyboardInterrupt):
        extract(tiny_extract_config(image_folder, out))
    assert f"the partial cache {partial_of(out)} is kept, so rerun the same command to resume" in caplog.text


# --labels ----------------------------------------------------------------------------------------

def write_labels(path: Path, rows: list[tuple[str, str]], header=("path", "label")) -> Path:
    with open(path, "w", newline="") as file:
        csv.writer(file).writerows([header, *rows])
    return path


def test_labels_with_manifest_data_rejected(image_folder, tmp_path):
    manifest = write_labels(tmp_path / "m.csv", [("joy/000.jpg", "joy")])
    relabel = write_labels(tmp_path / "relabel.csv", [("joy/000.jpg", "calm")])
    result = invoke("extract", manifest, "--labels", relabel, "--out", tmp_path / "c.h5", "--weights", "random")
    assert result.exit_code == 1
    assert f"--labels {relabel} cannot be combined with the manifest {manifest}" in result.output
    assert "--label-column" in result.output


def test_labels_leaving_out_images_warns(image_folder, tmp_path, caplog):
    from emo.data.scan import find_samples

    listed = [(f"{name}/{index:03d}.jpg", name) for name in ("calm", "joy") for index in range(20)]
    labels = write_labels(tmp_path / "two.csv", listed)
    _, samples, _ = find_samples(image_folder, labels_csv=labels)
    assert len(samples) == 40
    assert "20 image(s) under" in caplog.text
    assert "are not listed in --labels" in caplog.text
    assert "e.g. fear/000.jpg" in caplog.text


def test_labels_listing_every_image_is_quiet(image_folder, tmp_path, caplog):
    from emo.data.scan import find_samples

    listed = [(f"{name}/{index:03d}.jpg", name) for name in ("calm", "fear", "joy") for index in range(20)]
    find_samples(image_folder, labels_csv=write_labels(tmp_path / "all.csv", listed))
    assert "not listed" not in caplog.text


def test_folder_and_labels_csv_give_same_split(image_folder, tmp_path):
    from emo.data.scan import find_samples
    from emo.data.split import make_split

    rows = [(f"{name}/{index:03d}.jpg", name) for name in ("calm", "fear", "joy") for index in range(20)]
    rows.reverse()  # a CSV in another order than the folder walk
    labels = write_labels(tmp_path / "labels.csv", rows, header=("path", "folder_label"))
    _, by_folder, _ = find_samples(image_folder)
    _, by_csv, _ = find_samples(image_folder, labels_csv=labels, label_column="folder_label")
    assert by_folder == by_csv
    assert make_split([s.label for s in by_folder], seed=0) == make_split([s.label for s in by_csv], seed=0)


# Option help and validation ----------------------------------------------------------------------

def test_every_option_has_help():
    commands = {"": main, **{f" {name}": command for name, command in main.commands.items()}}
    for name, command in commands.items():
        for option in command.params:
            if isinstance(option, click.Option):
                assert option.help, f"emo{name} {option.opts[0]} has no help text"


@pytest.mark.parametrize("args, message", [
    (("--image-size", "16"), "--image-size must be at least 32, got 16"),
    (("--seed", "-1"), "--seed must be between 0 and 4294967295, got -1"),
    (("--batch-size", "0"), "--batch-size must be at least 1, got 0"),
])
def test_extract_errors_name_the_option(image_folder, tmp_path, args, message):
    result = invoke("extract", image_folder, "--out", tmp_path / "c.h5", "--weights", "random", *args)
    assert result.exit_code == 1
    assert f"Error: {message}" in result.output


def test_fit_heads_negative_seed(tiny_cache, tmp_path):
    result = invoke("fit-heads", tiny_cache, "--out", tmp_path / "run", "--seed", "-1")
    assert result.exit_code == 1
    assert "--seed must be between 0 and" in result.output


@pytest.mark.parametrize("top_k", ["0", "-1"])
def test_predict_top_k_below_one(matched_run, image_folder, top_k):
    _, run = matched_run
    result = invoke("predict", run, image_folder / "joy" / "000.jpg", "--top-k", top_k)
    assert result.exit_code == 1
    assert f"--top-k must be at least 1, got {top_k}" in result.output


def test_evaluate_device_validated(matched_run, tmp_path):
    _, run = matched_run
    result = invoke("evaluate", copy_run(run, tmp_path), "--device", "banana")
    assert result.exit_code == 1
    assert "invalid device 'banana'" in result.output


def test_verbose_leaves_other_loggers_quiet(matched_run, tmp_path):
    from tests.hostile import run_emo

    _, run = matched_run
    result = run_emo("-v", "evaluate", copy_run(run, tmp_path), "--split", "val")
    assert result.returncode == 0, result.stderr
    for name in ("matplotlib", "h5py", "PIL"):
        assert f"DEBUG {name}" not in result.stderr


def test_small_class_advice_names_a_real_way():
    from emo.data.split import make_split

    with pytest.raises(DataError, match="move its folder out of the dataset, or delete its rows from the manifest"):
        make_split(["anger"] * 17 + ["joy"] * 40, seed=0)
