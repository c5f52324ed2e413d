"""Crash safety of fit-heads run directories, clear rejection of incomplete or damaged runs, NaN losses."""

import errno
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from emo import runs
from emo.cli import main
from emo.errors import CacheError, RunError, TrainingError
from emo.heads import FitHeadsConfig, fit_heads
from emo.heads import outputs as head_outputs
from tests.hostile import jpeg_bytes, tiny_cache, tiny_run  # noqa: F401 (fixtures)

# Every function write_head_run calls to put a file into the run directory once start_run has
# marked it incomplete.
RUN_WRITERS = [(runs, "write_json_atomically"), (runs, "save_state_dict_atomically"), (runs, "append_jsonl"),
               (head_outputs, "write_metrics"), (runs, "finish_run")]


def heads_config(cache: Path, out: Path, **changes) -> FitHeadsConfig:
    options = dict(cache=cache, out=out, epochs=2, stack_epochs=1, batch_size=4)
    options.update(changes)
    return FitHeadsConfig(**options)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Return the relative path and bytes of every file under ``folder``."""
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file()}


def fail_at_call(monkeypatch, failing_call: int) -> list[str]:
    """Make the ``failing_call``-th call (from 0) to any run writer raise ENOSPC; return the names called."""
    calls: list[str] = []
    for module, name in RUN_WRITERS:
        original = getattr(module, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            if len(calls) - 1 == failing_call:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[0]))
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


def captured_run_outputs(cache: Path, monkeypatch) -> dict:
    """Train heads once and return the arguments fit_heads passes to write_head_run."""
    captured = {}
    with monkeypatch.context() as patch:
        patch.setattr("emo.heads.train.write_head_run", lambda config, **outputs: captured.update(outputs))
        fit_heads(heads_config(cache, Path("unused"), seed=1))
    return captured


def test_crash_at_every_write_step(tiny_cache, tiny_run, tmp_path, monkeypatch):
    outputs = captured_run_outputs(tiny_cache, monkeypatch)
    previous = snapshot(tiny_run)
    failing_call = 0
    while True:
        run = Path(shutil.copytree(tiny_run, tmp_path / f"run{failing_call}"))
        with monkeypatch.context() as patch:
            calls = fail_at_call(patch, failing_call)
            try:
                head_outputs.write_head_run(heads_config(tiny_cache, run, seed=1, overwrite=True), **outputs)
            except RunError as error:
                assert "No space left on device" in str(error)
            else:
                break
        state = snapshot(run)
        if runs.INCOMPLETE_MARKER not in state:
            assert state == previous, f"crash in call {failing_call} ({calls[-1]}) changed a run not marked incomplete"
        else:
            with pytest.raises(RunError, match="is incomplete"):
                runs.read_run_config(run)
        failing_call += 1
    # The crashes covered every write: config and classes JSON, the model, three history lines
    # (two branch epochs, one stacking epoch), write_metrics and its metrics.json, the marker removal.
    assert failing_call == len(calls) == 9
    assert runs.read_run_config(run)["kind"] == "heads"


def fail_if_called(*args, **kwargs):
    raise AssertionError("training started before the output was checked")


def test_run_folder_cannot_be_created(tiny_cache, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the run's parent folder should be")
    monkeypatch.setattr("emo.heads.train.train_branches", fail_if_called)
    with pytest.raises(RunError, match=f"cannot write run directory {blocker / 'run'}: {blocker} is a file"):
        fit_heads(heads_config(tiny_cache, blocker / "run"))


def incomplete_copy(tiny_run: Path, folder: Path) -> Path:
    run = Path(shutil.copytree(tiny_run, folder / "run"))
    (run / runs.INCOMPLETE_MARKER).write_text("interrupted\n")
    return run


def test_evaluate_rejects_incomplete_run(tiny_run, tmp_path):
    run = incomplete_copy(tiny_run, tmp_path)
    result = CliRunner().invoke(main, ["evaluate", str(run)])
    assert result.exit_code == 1
    assert f"run {run} is incomplete" in result.output
    assert result.exc_info[0] is SystemExit


def test_predict_rejects_incomplete_run(tiny_run, tmp_path):
    run = incomplete_copy(tiny_run, tmp_path)
    image = tmp_path / "photo.jpg"
    image.write_bytes(jpeg_bytes())
    result = CliRunner().invoke(main, ["predict", str(run), str(image)])
    assert result.exit_code == 1
    assert f"run {run} is incomplete" in result.output
    assert result.exc_info[0] is SystemExit


def test_nan_loss_stops_with_previous_run_kept(tiny_cache, tiny_run, tmp_path):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    previous = snapshot(run)
    with pytest.raises(TrainingError, match="the training loss became (nan|inf)|became NaN or infinite in epoch"):
        fit_heads(heads_config(tiny_cache, run, lr=1e30, epochs=5, overwrite=True))
    assert snapshot(run) == previous


def test_nan_loss_in_cli(tiny_cache, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["fit-heads", str(tiny_cache), "--out", str(out), "--lr", "1e30",
                                       "--epochs", "5", "--stack-epochs", "1"])
    assert result.exit_code == 1
    assert "Lower --lr (now 1e+30)" in result.output
    assert not out.exists()


def test_nonfinite_cache_features(tiny_cache, tmp_path):
    cache = Path(shutil.copy(tiny_cache, tmp_path / "cache.h5"))
    with h5py.File(cache, "r+") as file:
        file["features"]["L3"][0, 0] = np.inf
    with pytest.raises(CacheError, match="NaN or infinite L3 features"):
        fit_heads(heads_config(cache, tmp_path / "run"))


def test_finished_run_rejected_before_training(tiny_cache, tiny_run, monkeypatch):
    monkeypatch.setattr("emo.heads.train.train_branches", fail_if_called)
    with pytest.raises(RunError, match="already contains a finished run"):
        fit_heads(heads_config(tiny_cache, tiny_run))


def damaged_copy(tiny_run: Path, folder: Path, name: str, content: bytes) -> Path:
    run = Path(shutil.copytree(tiny_run, folder / "run"))
    (run / name).write_bytes(content)
    return run


def config_without(tiny_run: Path, key: str) -> bytes:
    settings = json.loads((tiny_run / "config.json").read_text())
    del settings[key]
    return json.dumps(settings).encode()


def other_state_dict() -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save({"linear.weight": torch.zeros(2, 2)}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("name, content, message", [
    ("config.json", b"{not json", "config.json is not a readable JSON file"),
    ("config.json", b"[1, 2]", "is not a run configuration: it is not a JSON object"),
    ("classes.json", b"\xff\xfe", "classes.json is not a readable JSON file"),
    ("classes.json", b'{"joy": 1}', "classes.json is not a list of class names"),
    ("model.pt", b"PK\x03\x04 truncated", "cannot load"),
    ("model.pt", other_state_dict(), "does not fit the heads described in config.json"),
])
def test_damaged_run_file(tiny_run, tmp_path, name, content, message):
    run = damaged_copy(tiny_run, tmp_path, name, content)
    result = CliRunner().invoke(main, ["evaluate", str(run)])
    assert result.exit_code == 1
    assert message in result.output
    assert result.exc_info[0] is SystemExit


@pytest.mark.parametrize("key, message", [
    ("backbone", "key 'backbone' is missing"),
    ("channels", "has no valid 'channels'"),
])
def test_run_config_missing_key(tiny_run, tmp_path, key, message):
    run = damaged_copy(tiny_run, tmp_path, "config.json", config_without(tiny_run, key))
    result = CliRunner().invoke(main, ["evaluate", str(run)])
    assert result.exit_code == 1
    assert message in result.output


def test_run_folder_not_writable(tiny_cache, tmp_path, monkeypatch):
    # Root may write anywhere, so the check's outcome is simulated rather than set with chmod.
    monkeypatch.setattr("emo.runs.os.access", lambda path, mode: False)
    monkeypatch.setattr("emo.heads.train.train_branches", fail_if_called)
    with pytest.raises(RunError, match=f"cannot write run directory {tmp_path / 'run'}: {tmp_path} is not writable"):
        fit_heads(heads_config(tiny_cache, tmp_path / "run"))


def test_run_backbone_record_incomplete(tiny_run, tmp_path):
    settings = json.loads((tiny_run / "config.json").read_text())
    del settings["backbone"]["image_size"]
    run = damaged_copy(tiny_run, tmp_path, "config.json", json.dumps(settings).encode())
    result = CliRunner().invoke(main, ["evaluate", str(run)])
    assert result.exit_code == 1
    assert "the backbone record lacks 'weights' or 'image_size'" in result.output
