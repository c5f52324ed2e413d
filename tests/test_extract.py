import csv
import hashlib
import json

import h5py
import numpy as np
import pytest
import torch

from emo.backbone import StageFeatures, build_resnet
from emo.cache import FeatureCache
from emo.cache.synthetic import write_synthetic_cache
from emo.data.images import load_rgb
from emo.data.transforms import eval_transform, resize_size
from emo.errors import CacheError
from emo.extract import extract
from tests.conftest import tiny_extract_config


def test_cache_datasets_have_one_row_per_image(tiny_cache):
    with h5py.File(tiny_cache, "r") as file:
        widths = {name: file["features"][name].shape for name in file["features"]}
        assert widths == {"L0": (60, 64), "L1": (60, 64), "L2": (60, 128), "L3": (60, 256), "L4": (60, 512)}
        assert file["labels"].shape == (60,)
        assert file["written"][:].all()
        assert sorted(set(file["split"].asstr()[:])) == ["test", "train", "val"]


def test_cache_attributes_record_provenance(tiny_cache):
    with FeatureCache(tiny_cache) as cache:
        assert cache.classes == ["calm", "fear", "joy"]
        assert cache.attrs["arch"] == "resnet18"
        assert cache.weights["spec"] == "random"
        assert cache.weights["source"] == "random initialisation, seed 0"
        assert len(cache.weights["sha256"]) == 64
        assert int(cache.attrs["image_size"]) == 32
        assert cache.normalization["mean"] == [0.485, 0.456, 0.406]
        assert "average" in cache.attrs["pooling"]
        assert int(cache.attrs["schema_version"]) == 1


def test_cached_rows_equal_direct_forward(tiny_cache, image_folder):
    with FeatureCache(tiny_cache) as cache:
        paths = cache.paths()[:4]
        cached = cache.features("L3")[:4]
    model, _ = build_resnet("resnet18", "random", seed=0)
    transform = eval_transform(32)
    images = torch.stack([transform(load_rgb(image_folder / p, draft_size=resize_size(32))) for p in paths])
    with torch.no_grad():
        direct = StageFeatures(model)(images)["L3"].numpy()
    np.testing.assert_allclose(cached, direct, rtol=1e-4, atol=1e-5)


def test_split_csv_next_to_cache_has_hashes(tiny_cache, image_folder):
    path = tiny_cache.with_name("tiny.split.csv")
    rows = list(csv.DictReader(open(path)))
    assert len(rows) == 60
    first = rows[0]
    assert first["sha256"] == hashlib.sha256((image_folder / first["path"]).read_bytes()).hexdigest()
    with FeatureCache(tiny_cache) as cache:
        assert [row["split"] for row in rows] == list(cache._split)


def test_split_file_is_reused(tiny_cache, image_folder, tmp_path):
    out = tmp_path / "again.h5"
    extract(tiny_extract_config(image_folder, out, split_file=tiny_cache.with_name("tiny.split.csv"), seed=7))
    with FeatureCache(out) as again, FeatureCache(tiny_cache) as first:
        assert list(again._split) == list(first._split)


def test_existing_cache_needs_overwrite(tiny_cache, image_folder, tmp_path):
    out = tmp_path / "c.h5"
    out.write_bytes(b"keep me")
    with pytest.raises(CacheError, match="already exists; pass --overwrite"):
        extract(tiny_extract_config(image_folder, out))
    assert out.read_bytes() == b"keep me"


def test_float16_overflow_is_a_clear_error(image_folder, tmp_path):
    model, _ = build_resnet("resnet18", "random")
    state = model.state_dict()
    state["layer4.1.bn2.weight"] *= 1e7  # pushes the L4 outputs past float16's maximum, 65504
    weights = tmp_path / "huge.pt"
    torch.save(state, weights)
    config = tiny_extract_config(image_folder, tmp_path / "c.h5", weights=str(weights), dtype="float16")
    with pytest.raises(CacheError, match="beyond the float16 range.*--dtype float32"):
        extract(config)


def test_reader_rejects_foreign_hdf5(tmp_path):
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as file:
        file["x"] = np.zeros(3)
    with pytest.raises(CacheError, match="not an emo-vision feature cache"):
        FeatureCache(path)


def test_reader_rejects_non_hdf5(tmp_path):
    path = tmp_path / "text.h5"
    path.write_text("hello")
    with pytest.raises(CacheError, match="not a readable HDF5 file"):
        FeatureCache(path)


def test_reader_rejects_newer_schema(tmp_path):
    path = write_synthetic_cache(tmp_path / "s.h5", rows=60, classes=["a", "b"], arch="resnet18")
    with h5py.File(path, "r+") as file:
        file.attrs["schema_version"] = 99
    with pytest.raises(CacheError, match="schema version 99, newer"):
        FeatureCache(path)


def test_reader_rejects_incomplete(tmp_path):
    path = write_synthetic_cache(tmp_path / "s.h5", rows=60, classes=["a", "b"], arch="resnet18")
    with h5py.File(path, "r+") as file:
        file.attrs["complete"] = False
    with pytest.raises(CacheError, match="incomplete"):
        FeatureCache(path)


def test_reader_require_classes(tiny_cache):
    with FeatureCache(tiny_cache) as cache:
        with pytest.raises(CacheError, match="classes \\['calm', 'fear', 'joy'\\], but the run expects"):
            cache.require_classes(["calm", "joy"])


def test_synthetic_cache_matches_contract(tmp_path):
    path = write_synthetic_cache(tmp_path / "s.h5", rows=100, classes=["a", "b", "c"], chunk_rows=30)
    with FeatureCache(path) as cache:
        assert len(cache) == 100
        assert cache.features("L4").shape == (100, 2048)
        assert json.loads(cache.attrs["stages"])["L0"] == 64
