"""Reading caches: damaged, foreign and mismatched files give clear errors; readers work in parallel."""

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import DataLoader, Dataset

from emo.cache.reader import FeatureCache
from emo.cli import main
from emo.errors import CacheError
from emo.extract import extract
from tests.hostile import small_dataset, tiny_cache, tiny_extract_config, tiny_run  # noqa: F401 (fixtures)


def copy_of(cache: Path, folder: Path, name: str = "copy.h5") -> Path:
    return Path(shutil.copy(cache, folder / name))


def set_attr(cache: Path, name: str, value) -> None:
    with h5py.File(cache, "r+") as file:
        file.attrs[name] = value


def test_truncated_cache(tiny_cache, tmp_path):
    data = tiny_cache.read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match="not a readable HDF5 file"):
        FeatureCache(truncated)


def test_truncated_cache_in_cli(tiny_cache, tmp_path):
    data = tiny_cache.read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 2])
    result = CliRunner().invoke(main, ["fit-heads", str(truncated), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert f"{truncated} is not a readable HDF5 file" in result.output
    assert result.exc_info[0] is SystemExit


def test_text_file_named_h5(tmp_path):
    fake = tmp_path / "notes.h5"
    fake.write_text("not HDF5 at all\n")
    with pytest.raises(CacheError, match="not a readable HDF5 file"):
        FeatureCache(fake)


def test_foreign_hdf5_file(tmp_path):
    foreign = tmp_path / "keras-model.h5"
    with h5py.File(foreign, "w") as file:
        file.create_dataset("model_weights", data=np.zeros((3, 3)))
        file.attrs["backend"] = "tensorflow"
    with pytest.raises(CacheError, match="not an emo-vision feature cache"):
        FeatureCache(foreign)


def test_newer_schema_version(tiny_cache, tmp_path):
    cache = copy_of(tiny_cache, tmp_path)
    set_attr(cache, "schema_version", 99)
    with pytest.raises(CacheError, match="schema version 99, newer than this emo-vision supports"):
        FeatureCache(cache)


def test_incomplete_flag(tiny_cache, tmp_path):
    cache = copy_of(tiny_cache, tmp_path)
    set_attr(cache, "complete", False)
    with pytest.raises(CacheError, match="is incomplete"):
        FeatureCache(cache)


def test_partial_file_renamed_to_h5(tiny_cache, tmp_path):
    cache = copy_of(tiny_cache, tmp_path)
    with h5py.File(cache, "r+") as file:
        file["written"][3] = False
    with pytest.raises(CacheError, match=r"1 row\(s\) were never written"):
        FeatureCache(cache)


def test_invalid_json_attribute(tiny_cache, tmp_path):
    cache = copy_of(tiny_cache, tmp_path)
    set_attr(cache, "classes", "[not json")
    with pytest.raises(CacheError, match="invalid 'classes' attribute"):
        FeatureCache(cache)


def test_label_out_of_range(tiny_cache, tmp_path):
    cache = copy_of(tiny_cache, tmp_path)
    with h5py.File(cache, "r+") as file:
        file["labels"][0] = 7
    with pytest.raises(CacheError, match="label indices outside 0..2"):
        FeatureCache(cache)


def test_missing_stage_dataset(tiny_cache, tmp_path):
    cache = copy_of(tiny_cache, tmp_path)
    with h5py.File(cache, "r+") as file:
        del file["features"]["L2"]
    with pytest.raises(CacheError, match="dataset features/L2 has shape None"):
        FeatureCache(cache)


def overwrite_bytes(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as raw:
        raw.seek(offset)
        raw.write(data)


def test_damaged_object_header(tiny_cache, tmp_path):
    """Garbage in a dataset's HDF5 object header: the file opens, the dataset does not."""
    cache = copy_of(tiny_cache, tmp_path)
    with h5py.File(cache, "r") as file:
        header = h5py.h5o.get_info(file["features"]["L4"].id).addr
    overwrite_bytes(cache, header, b"\xff" * 16)
    with pytest.raises(CacheError, match="is damaged"):
        FeatureCache(cache)


def test_damaged_label_bytes(tiny_cache, tmp_path):
    """Garbage in the raw label data shows up as an index outside the class list."""
    cache = copy_of(tiny_cache, tmp_path)
    with h5py.File(cache, "r") as file:
        offset = file["labels"].id.get_offset()
    overwrite_bytes(cache, offset, b"\xff" * 8)
    with pytest.raises(CacheError, match="label indices outside"):
        FeatureCache(cache)


def test_classes_differ_from_run(tiny_run, tiny_cache, tmp_path):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    other = copy_of(tiny_cache, tmp_path, "other.h5")
    set_attr(other, "classes", json.dumps(["anger", "calm", "joy"]))
    result = CliRunner().invoke(main, ["evaluate", str(run), "--cache", str(other)])
    assert result.exit_code == 1
    assert "has classes ['anger', 'calm', 'joy'], but the run expects ['fear', 'joy', 'sadness']" in result.output


def test_classes_in_other_order(tiny_run, tiny_cache, tmp_path):
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    other = copy_of(tiny_cache, tmp_path, "other.h5")
    set_attr(other, "classes", json.dumps(["joy", "fear", "sadness"]))
    result = CliRunner().invoke(main, ["evaluate", str(run), "--cache", str(other)])
    assert result.exit_code == 1
    assert "but the run expects ['fear', 'joy', 'sadness']" in result.output


class CacheRows(Dataset):
    """Rows of one stage; each DataLoader worker opens the cache itself on first use."""

    def __init__(self, path: Path, stage: str):
        self.path = path
        self.stage = stage
        self.cache = None
        with FeatureCache(path) as cache:
            self.length = len(cache)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.cache is None:
            self.cache = FeatureCache(self.path)
        worker = torch.utils.data.get_worker_info()
        return torch.from_numpy(self.cache.features(self.stage)[index]), worker.id if worker else -1


def test_parallel_readers_with_dataloader_workers(tiny_cache):
    with FeatureCache(tiny_cache) as parent:
        expected = parent.features("L4")
        loader = DataLoader(CacheRows(tiny_cache, "L4"), batch_size=4, num_workers=2)
        batches = list(loader)
        # The parent still reads while the workers have had the file open.
        assert np.array_equal(parent.features("L4"), expected)
    rows = torch.cat([features for features, _ in batches]).numpy()
    workers = {int(worker) for _, ids in batches for worker in ids}
    assert np.array_equal(rows, expected)
    assert workers == {0, 1}


def test_reader_survives_overwrite(tiny_cache, tmp_path):
    data = small_dataset(tmp_path)
    out = copy_of(tiny_cache, tmp_path, "cache.h5")
    with FeatureCache(out) as before:
        old = before.features("L0")
        extract(tiny_extract_config(data, out, image_size=40, overwrite=True))
        # The open reader keeps the replaced file's data; new readers see the new cache.
        assert np.array_equal(before.features("L0"), old)
    with FeatureCache(out) as after:
        assert after.backbone_record()["image_size"] == 40


@pytest.mark.parametrize("name, value, message", [
    ("schema_version", "one", "invalid schema version 'one'"),
    ("classes", json.dumps({"joy": 0}), "attribute 'classes' is not a list of class names"),
    ("stages", json.dumps(["L0", "L4"]), "attribute 'stages' is not a mapping of stage names to channels"),
    ("format", "some other tool", "is an HDF5 file but not an emo-vision feature cache"),
])
def test_invalid_attribute(tiny_cache, tmp_path, name, value, message):
    cache = copy_of(tiny_cache, tmp_path)
    set_attr(cache, name, value)
    with pytest.raises(CacheError, match=message):
        FeatureCache(cache)


def test_missing_attribute(tiny_cache, tmp_path):
    cache = copy_of(tiny_cache, tmp_path)
    with h5py.File(cache, "r+") as file:
        del file.attrs["fingerprint"]
    with pytest.raises(CacheError, match="lacks attribute 'fingerprint'"):
        FeatureCache(cache)


def test_missing_dataset(tiny_cache, tmp_path):
    cache = copy_of(tiny_cache, tmp_path)
    with h5py.File(cache, "r+") as file:
        del file["split"]
    with pytest.raises(CacheError, match="lacks dataset 'split'"):
        FeatureCache(cache)


def test_missing_cache_file(tmp_path):
    with pytest.raises(CacheError, match="not found; create it with `emo extract`"):
        FeatureCache(tmp_path / "none.h5")


def test_cache_locked_by_another_program(tiny_cache, monkeypatch):
    def locked(*args, **kwargs):
        raise BlockingIOError(11, "Unable to synchronously open file (unable to lock file, errno = 11, "
                                  "error message = 'Resource temporarily unavailable')")

    monkeypatch.setattr("emo.cache.reader.h5py.File", locked)
    with pytest.raises(CacheError, match="set HDF5_USE_FILE_LOCKING=FALSE"):
        FeatureCache(tiny_cache)


def test_read_error_after_open(tiny_cache, monkeypatch):
    """An I/O error while reading rows (failing disk, network file system) is a CacheError."""
    with FeatureCache(tiny_cache) as cache:
        def failing_read(self, selection):
            raise OSError("Can't read data (file read failed, error message = 'Input/output error')")

        monkeypatch.setattr(h5py.Dataset, "__getitem__", failing_read)
        with pytest.raises(CacheError, match=f"reading cache {tiny_cache} failed \\(Input/output error\\)"):
            cache.features("L4", "train")
