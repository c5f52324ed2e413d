import json
import shutil

import numpy as np
import pytest
from PIL import Image

from emo.errors import CacheError, RunError, WeightsError
from emo.evaluate.metrics import compute_metrics, format_table
from emo.evaluate.run import evaluate_run
from emo.predict import predict
from emo.runs import INCOMPLETE_MARKER


@pytest.fixture
def run_copy(head_run, tmp_path):
    return shutil.copytree(head_run, tmp_path / "run")


def test_metrics_against_hand_count():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 1, 0, 1, 1, 0])
    metrics = compute_metrics(y_true, y_pred, ["a", "b", "c"])
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["per_class_recall"] == {"a": pytest.approx(2 / 3), "b": 1.0, "c": 0.0}
    assert metrics["macro_recall"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert metrics["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_metrics_class_absent_from_split():
    metrics = compute_metrics(np.array([0, 0]), np.array([0, 1]), ["a", "b"])
    assert metrics["per_class_recall"]["b"] is None
    assert metrics["macro_recall"] == 0.5


def test_format_table_has_row_per_model():
    metrics = compute_metrics(np.array([0, 1]), np.array([0, 1]), ["a", "b"])
    lines = format_table({"stacked": metrics, "L4": metrics}).splitlines()
    assert lines[0].split() == ["model", "accuracy", "macro_recall", "a", "b"]
    assert lines[2].split()[:2] == ["L4", "1.0000"]


def test_evaluate_reproduces_training_metrics(run_copy):
    stored = json.loads((run_copy / "metrics.json").read_text())
    recomputed = evaluate_run(run_copy, split="test")
    assert recomputed["models"] == stored["models"]


def test_evaluate_other_split_keeps_test_files(run_copy):
    before = (run_copy / "metrics.json").read_text()
    metrics = evaluate_run(run_copy, split="train")
    assert metrics["split"] == "train"
    assert (run_copy / "metrics-train.json").exists()
    assert (run_copy / "confusion_matrix-train.png").exists()
    assert (run_copy / "metrics.json").read_text() == before


def test_evaluate_rejects_cache_with_other_classes(run_copy, tmp_path):
    from emo.cache.synthetic import write_synthetic_cache

    other = write_synthetic_cache(tmp_path / "other.h5", rows=60, classes=["x", "y"], arch="resnet18")
    with pytest.raises(CacheError, match="but the run expects"):
        evaluate_run(run_copy, cache=other)


def test_incomplete_run_is_rejected(run_copy):
    (run_copy / INCOMPLETE_MARKER).write_text("")
    with pytest.raises(RunError, match="incomplete"):
        evaluate_run(run_copy)
    with pytest.raises(RunError, match="incomplete"):
        predict(run_copy, [])


def test_missing_run_directory(tmp_path):
    with pytest.raises(RunError, match="not found"):
        evaluate_run(tmp_path / "nothing")


def test_predict_returns_top_classes(head_run, image_folder):
    results = predict(head_run, [image_folder / "joy" / "000.jpg"], device="cpu", top_k=2)
    top = results[0]["top"]
    assert len(top) == 2
    assert top[0]["probability"] >= top[1]["probability"]
    assert {item["class"] for item in top} <= {"calm", "fear", "joy"}


def test_predict_matches_cached_features_path(head_run, image_folder, tiny_cache):
    # Backbone + heads on the image must give the same class as the heads on the cached row.
    from emo.cache import FeatureCache
    from emo.heads.outputs import load_head_model
    from emo.heads.train import head_probabilities
    from emo.runs import read_run_config
    import torch

    with FeatureCache(tiny_cache) as cache:
        relpath = cache.paths()[0]
        features = {name: torch.from_numpy(cache.features(name)[:1]) for name in cache.stages}
    settings = read_run_config(head_run)
    expected = head_probabilities(load_head_model(head_run, settings), features)["stacked"][0]
    result = predict(head_run, [image_folder / relpath], device="cpu", top_k=3)[0]
    got = {item["class"]: item["probability"] for item in result["top"]}
    for index, name in enumerate(settings["classes"]):
        assert got[name] == pytest.approx(float(expected[index]), abs=1e-4)


def test_predict_reports_bad_image_and_continues(head_run, image_folder, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    results = predict(head_run, [bad, image_folder / "joy" / "001.jpg"], device="cpu")
    assert results[0] == {"path": str(bad), "error": "not an image Pillow can read"}
    assert "top" in results[1]


def test_predict_rejects_other_backbone_weights(head_run, image_folder, tmp_path):
    import torch
    from emo.backbone import build_resnet

    model, _ = build_resnet("resnet18", "random", seed=42)
    path = tmp_path / "other.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(WeightsError, match="differ from the weights the heads were trained on"):
        predict(head_run, [image_folder / "joy" / "000.jpg"], weights=str(path))


def test_confusion_png_is_a_real_figure(head_run):
    with Image.open(head_run / "confusion_matrix.png") as image:
        assert image.size[0] >= 300
        assert image.size[1] >= 300
