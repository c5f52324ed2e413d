"""Crash safety of ``emo extract``: kill-and-resume, changed commands, the writer lock, disk errors."""

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from emo.cache import writer as cache_writer
from emo.cache.reader import FeatureCache
from emo.errors import CacheError
from emo.extract import extract
from tests.hostile import emo_command, jpeg_bytes, run_emo, small_dataset, subprocess_env, tiny_extract_config
from tests.hostile import tiny_cache  # noqa: F401 (fixture)

HARNESS = Path(__file__).with_name("stop_after_rows.py")
STAGES = ("L0", "L1", "L2", "L3", "L4")
# Small batches make 12 forward passes for 24 images, so the kill points fall well inside the run.
EXTRACT_OPTIONS = ("--weights", "random", "--arch", "resnet18", "--image-size", "32", "--batch-size", "2",
                   "--workers", "0", "--dtype", "float32")
# Rows of small_dataset: 3 classes of 8 images.
ROWS = 24


def extract_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["extract", str(data), "--out", str(out), "--split-file", str(data.parent / "split.csv"),
            *EXTRACT_OPTIONS, *extra]


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def written_rows(partial: Path) -> int:
    """Count the rows a partial cache marks as written, reading it while another process may hold it."""
    with h5py.File(partial, "r", locking=False) as file:
        return int(np.count_nonzero(file["written"][:]))


def start_and_stop(rows: int, args: list[str], log: Path) -> subprocess.Popen:
    """Start ``emo ARGS`` under the stop harness and wait until it stops after ``rows`` rows."""
    with open(log, "w") as output:
        process = subprocess.Popen([sys.executable, str(HARNESS), str(rows), *args], env=subprocess_env(),
                                   stdout=output, stderr=subprocess.STDOUT)
    _, status = os.waitpid(process.pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):
        pytest.fail(f"extraction ended before the stop at {rows} rows:\n{log.read_text()}")
    return process


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


def cache_content(path: Path) -> dict:
    """Return every dataset and attribute of a cache file as plain values."""
    with h5py.File(path, "r") as file:
        content = {f"features/{stage}": file["features"][stage][:] for stage in STAGES}
        for name in ("labels", "split", "paths", "sha256", "written"):
            content[name] = file[name][:]
        content["attrs"] = {key: file.attrs[key] for key in file.attrs if key != "config"}
    return content


def test_killed_extraction_resumes_identically(tmp_path):
    data = small_dataset(tmp_path)
    reference = tmp_path / "reference.h5"
    # The same batch size as the command line, so both runs put each image in the same batch.
    extract(tiny_extract_config(data, reference, batch_size=2))
    out = tmp_path / "cache.h5"
    partial = partial_path(out)

    # Kill point 1: the partial file exists and no row is written yet.
    process = start_and_stop(0, extract_args(data, out), tmp_path / "run1.log")
    # While that process has the cache locked, a second writer must be rejected.
    try:
        with pytest.raises(CacheError, match=f"cache {out} is in use by another `emo extract`"):
            extract(tiny_extract_config(data, out))
    finally:
        kill(process)
    assert partial.is_file()
    assert not out.exists()
    assert written_rows(partial) == 0

    # Kill point 2: after the first four rows (two batches); the rows must survive the kill.
    process = start_and_stop(4, extract_args(data, out), tmp_path / "run2.log")
    kill(process)
    assert written_rows(partial) >= 4

    # Kill point 3: wherever the extraction happens to be once half of the rows are flagged: in a
    # forward pass, between a feature write and its flag write, or inside a flush.
    with open(tmp_path / "run3.log", "w") as log:
        process = subprocess.Popen(emo_command(*extract_args(data, out)), env=subprocess_env(), stdout=log,
                                   stderr=subprocess.STDOUT)
    while process.poll() is None and _written_or_zero(partial) < ROWS // 2:
        time.sleep(0.01)
    kill(process)
    assert process.returncode == -signal.SIGKILL, (tmp_path / "run3.log").read_text()
    written = written_rows(partial)
    assert written >= ROWS // 2

    finished = run_emo(*extract_args(data, out))
    assert finished.returncode == 0, finished.stderr
    assert f"resuming {partial}: {written} of {ROWS} rows already written" in finished.stderr
    assert not partial.exists()

    expected, actual = cache_content(reference), cache_content(out)
    for name in ("labels", "split", "paths", "sha256", "written"):
        assert np.array_equal(actual[name], expected[name]), name
    for stage in STAGES:
        assert np.array_equal(actual[f"features/{stage}"], expected[f"features/{stage}"]), stage
    assert actual["attrs"].keys() == expected["attrs"].keys()
    for key in expected["attrs"]:
        assert np.array_equal(actual["attrs"][key], expected["attrs"][key]), key


def _written_or_zero(partial: Path) -> int:
    # The partial file is renamed into place complete, but the poll may come before that.
    try:
        return written_rows(partial)
    except (OSError, KeyError):
        return 0


def interrupted_partial(data: Path, out: Path, monkeypatch, rows: int = 4) -> Path:
    """Leave a partial cache of ``out`` with ``rows`` rows written (batches of 2), as a Ctrl-C would."""
    original = cache_writer.CacheWriter.write

    def write_then_interrupt(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if len(self.file["written"]) - len(self.pending_rows()) >= rows:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(cache_writer.CacheWriter, "write", write_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            extract(tiny_extract_config(data, out, batch_size=2))
    return partial_path(out)


@pytest.mark.parametrize("change, reason", [
    ({"image_size": 40}, "image_size"),
    ({"seed": 1}, "weights"),
    ({"dtype": "float16"}, "dtype"),
])
def test_changed_command_does_not_resume(tmp_path, monkeypatch, change, reason):
    data = small_dataset(tmp_path)
    out = tmp_path / "cache.h5"
    partial = interrupted_partial(data, out, monkeypatch)
    rows_before = written_rows(partial)
    with pytest.raises(CacheError, match="started by a different command") as error:
        extract(tiny_extract_config(data, out, **change))
    assert reason in str(error.value)
    assert rows_before > 0
    assert written_rows(partial) == rows_before


def test_changed_file_list_does_not_resume(tmp_path, monkeypatch):
    data = small_dataset(tmp_path)
    out = tmp_path / "cache.h5"
    interrupted_partial(data, out, monkeypatch)
    (data / "joy" / "joy_000.jpg").write_bytes(jpeg_bytes(seed=7))
    with pytest.raises(CacheError, match="differs in rows"):
        extract(tiny_extract_config(data, out))


def test_changed_command_starts_over_with_overwrite(tmp_path, monkeypatch):
    data = small_dataset(tmp_path)
    out = tmp_path / "cache.h5"
    interrupted_partial(data, out, monkeypatch)
    summary = extract(tiny_extract_config(data, out, image_size=40, overwrite=True))
    assert summary.written_now == ROWS
    with FeatureCache(out) as cache:
        assert cache.backbone_record()["image_size"] == 40


def test_unreadable_partial_starts_over(tmp_path, caplog):
    data = small_dataset(tmp_path)
    out = tmp_path / "cache.h5"
    partial_path(out).write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
    summary = extract(tiny_extract_config(data, out))
    assert summary.written_now == ROWS
    assert f"partial cache {partial_path(out)} is unreadable" in caplog.text


def test_existing_cache_rejected_before_scan(tmp_path, monkeypatch):
    data = small_dataset(tmp_path)
    out = tmp_path / "cache.h5"
    out.write_bytes(b"previous")
    monkeypatch.setattr("emo.extract.run.scan_dataset", _fail_if_called)
    with pytest.raises(CacheError, match="already exists"):
        extract(tiny_extract_config(data, out))


def _fail_if_called(*args, **kwargs):
    raise AssertionError("the dataset was scanned before the output was checked")


def test_overwrite_keeps_previous_cache_until_complete(tiny_cache, tmp_path, monkeypatch):
    data = small_dataset(tmp_path)
    out = Path(shutil.copy(tiny_cache, tmp_path / "cache.h5"))
    before = hashlib.sha256(out.read_bytes()).hexdigest()
    original = cache_writer.CacheWriter.write

    def write_then_interrupt(self, *args, **kwargs):
        original(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_writer.CacheWriter, "write", write_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        extract(tiny_extract_config(data, out, image_size=40, overwrite=True))
    assert hashlib.sha256(out.read_bytes()).hexdigest() == before


def test_unwritable_folder_named_in_error(tmp_path, monkeypatch):
    data = small_dataset(tmp_path)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output folder should be")
    monkeypatch.setattr("emo.extract.run.scan_dataset", _fail_if_called)
    with pytest.raises(CacheError, match=f"output folder {blocker} does not exist"):
        extract(tiny_extract_config(data, blocker / "cache.h5"))


def raise_enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_creating(tiny_cache, tmp_path, monkeypatch):
    data = small_dataset(tmp_path)
    out = Path(shutil.copy(tiny_cache, tmp_path / "cache.h5"))
    before = hashlib.sha256(out.read_bytes()).hexdigest()
    monkeypatch.setattr(cache_writer.CacheWriter, "_create_layout", raise_enospc)
    with pytest.raises(CacheError, match=f"creating {partial_path(out)} failed: .*No space left on device"):
        extract(tiny_extract_config(data, out, overwrite=True))
    assert not partial_path(out).exists()
    assert not Path(f"{partial_path(out)}.tmp").exists()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == before


def test_disk_full_while_writing_rows(tiny_cache, tmp_path, monkeypatch):
    data = small_dataset(tmp_path)
    out = Path(shutil.copy(tiny_cache, tmp_path / "cache.h5"))
    before = hashlib.sha256(out.read_bytes()).hexdigest()
    monkeypatch.setattr(h5py.Dataset, "__setitem__", raise_enospc)
    with pytest.raises(CacheError) as error:
        extract(tiny_extract_config(data, out, image_size=40, overwrite=True))
    assert str(partial_path(out)) in str(error.value)
    assert "No space left on device" in str(error.value)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == before


def test_disk_full_while_writing_split(tmp_path, monkeypatch):
    data = small_dataset(tmp_path)
    out = tmp_path / "cache.h5"
    monkeypatch.setattr("emo.extract.run.write_split_csv", raise_enospc)
    with pytest.raises(CacheError) as error:
        extract(tiny_extract_config(data, out))
    assert "cache.split.csv" in str(error.value)
    assert not out.exists()


def unshare_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    return probe.returncode == 0


needs_unshare = pytest.mark.skipif(not unshare_available(),
                                   reason="needs `unshare` with user and mount namespaces to mount a private tmpfs")


def run_in_private_tmpfs(mount: Path, script: str) -> subprocess.CompletedProcess:
    """Run a shell script in a private mount namespace in which ``mount`` is a fresh 2 MiB tmpfs.

    The mount exists only inside that namespace, so no other process on the machine can reach it.
    """
    mount.mkdir()
    setup = f"mount -t tmpfs -o size=2m emo-test {mount} && "
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", setup + script],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)


@needs_unshare
@pytest.mark.slow
def test_real_disk_full_and_read_only_folder(tiny_cache, tmp_path):
    data = small_dataset(tmp_path)
    previous = tiny_cache
    digest = hashlib.sha256(previous.read_bytes()).hexdigest()
    mount = tmp_path / "small"
    cache = mount / "cache.h5"
    command = " ".join(emo_command(*extract_args(data, cache, "--overwrite")))
    # Fill the tmpfs, leave 100 KiB free, and extract into it; then make it read-only and retry.
    script = (f"cp {previous} {cache} && "
              f"head -c 10000000 /dev/zero > {mount}/filler; truncate -s -102400 {mount}/filler && "
              f"{command} > {tmp_path}/full.out 2>&1; echo $? > {tmp_path}/full.rc; "
              f"sha256sum {cache} > {tmp_path}/full.sha; "
              f"mount -o remount,ro {mount} && "
              f"{command} > {tmp_path}/readonly.out 2>&1; echo $? > {tmp_path}/readonly.rc; "
              f"sha256sum {cache} > {tmp_path}/readonly.sha")
    result = run_in_private_tmpfs(mount, script)
    assert result.returncode == 0, result.stderr

    full = (tmp_path / "full.out").read_text()
    assert (tmp_path / "full.rc").read_text().strip() == "1", full
    assert f"creating {cache}.partial failed: No space left on device" in full
    assert "Traceback" not in full
    assert "buf = 0x" not in full
    assert (tmp_path / "full.sha").read_text().split()[0] == digest

    readonly = (tmp_path / "readonly.out").read_text()
    assert (tmp_path / "readonly.rc").read_text().strip() == "1", readonly
    assert f"output folder {mount} is not writable" in readonly
    assert (tmp_path / "readonly.sha").read_text().split()[0] == digest


def test_lock_file_cannot_be_created(tmp_path):
    data = small_dataset(tmp_path)
    out = tmp_path / "cache.h5"
    Path(f"{out}.lock").mkdir()
    with pytest.raises(CacheError, match=f"cannot create lock file {out}.lock: Is a directory"):
        extract(tiny_extract_config(data, out))


def test_file_system_without_locks(tmp_path, monkeypatch):
    data = small_dataset(tmp_path)
    out = tmp_path / "cache.h5"

    def no_locks(*args):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(cache_writer.fcntl, "flock", no_locks)
    with pytest.raises(CacheError, match=f"cannot lock {out}.lock: No locks available"):
        extract(tiny_extract_config(data, out))


def test_hdf5_cannot_lock_new_file(tmp_path, monkeypatch):
    data = small_dataset(tmp_path)
    out = tmp_path / "cache.h5"

    def lock_failure(*args):
        raise OSError("Unable to synchronously create file (unable to lock file, errno = 38, "
                      "error message = 'Function not implemented')")

    monkeypatch.setattr(cache_writer.CacheWriter, "_create_layout", lock_failure)
    with pytest.raises(CacheError, match="HDF5 cannot lock files in .*; set HDF5_USE_FILE_LOCKING=FALSE"):
        extract(tiny_extract_config(data, out))


def h5py_file_failing(monkeypatch, mode: str, message: str) -> None:
    """Make h5py.File, as the writer calls it, raise OSError(message) when opening in ``mode``."""
    real_file = h5py.File

    def file(path, open_mode="r", *args, **kwargs):
        if open_mode == mode:
            raise OSError(message)
        return real_file(path, open_mode, *args, **kwargs)

    monkeypatch.setattr(cache_writer.h5py, "File", file)


def test_partial_open_in_another_program(tmp_path, monkeypatch):
    data = small_dataset(tmp_path)
    out = tmp_path / "cache.h5"
    partial = interrupted_partial(data, out, monkeypatch)
    rows_before = written_rows(partial)
    h5py_file_failing(monkeypatch, "r+", "Unable to synchronously open file (unable to lock file, errno = 11, "
                                         "error message = 'Resource temporarily unavailable')")
    with pytest.raises(CacheError, match=f"{partial} is open in another program"):
        extract(tiny_extract_config(data, out, batch_size=2))
    assert written_rows(partial) == rows_before


def test_new_partial_cannot_be_reopened(tmp_path, monkeypatch):
    data = small_dataset(tmp_path)
    out = tmp_path / "cache.h5"
    h5py_file_failing(monkeypatch, "r+", "Unable to synchronously open file (file read failed, "
                                         "error message = 'Input/output error')")
    with pytest.raises(CacheError, match=f"cannot open {partial_path(out)}: Input/output error"):
        extract(tiny_extract_config(data, out))


def test_damaged_partial_starts_over(tmp_path, monkeypatch, caplog):
    data = small_dataset(tmp_path)
    out = tmp_path / "cache.h5"
    partial = interrupted_partial(data, out, monkeypatch)
    with h5py.File(partial, "r+") as file:
        del file["sha256"]
    summary = extract(tiny_extract_config(data, out, batch_size=2))
    assert summary.written_now == ROWS
    assert f"partial cache {partial} is damaged (dataset 'sha256' is missing" in caplog.text


def test_close_failure_when_finishing(tmp_path, monkeypatch):
    data = small_dataset(tmp_path)
    out = tmp_path / "cache.h5"
    real_close = h5py.File.close

    def close(self):
        partial = self.id.valid and self.filename.endswith(".partial")
        real_close(self)
        if partial:
            raise OSError("Unable to close file (file write failed, error message = 'Input/output error')")

    monkeypatch.setattr(h5py.File, "close", close)
    with pytest.raises(CacheError, match=f"closing {partial_path(out)} failed: Input/output error"):
        extract(tiny_extract_config(data, out))
    assert not out.exists()


def test_close_failure_after_write_failure(tmp_path, monkeypatch, caplog):
    data = small_dataset(tmp_path)
    out = tmp_path / "cache.h5"
    real_close = h5py.File.close

    def close(self):
        partial = self.id.valid and self.filename.endswith(".partial")
        real_close(self)
        if partial:
            raise OSError("Unable to close file (file write failed, error message = 'Input/output error')")

    monkeypatch.setattr(h5py.File, "close", close)
    monkeypatch.setattr(h5py.Dataset, "__setitem__", raise_enospc)
    with pytest.raises(CacheError, match="writing rows to .* failed: .*No space left on device"):
        extract(tiny_extract_config(data, out))
    assert f"closing {partial_path(out)} after an error failed as well" in caplog.text


def test_rename_failure_when_finishing(tmp_path, monkeypatch):
    data = small_dataset(tmp_path)
    out = tmp_path / "cache.h5"
    real_replace = os.replace

    def replace(source, target):
        if str(target) == str(out):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_replace(source, target)

    monkeypatch.setattr(cache_writer.os, "replace", replace)
    with pytest.raises(CacheError, match=f"finishing {partial_path(out)} as {out} failed"):
        extract(tiny_extract_config(data, out))
    assert partial_path(out).is_file()
