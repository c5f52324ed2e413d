"""Checks on the real Emotion6 photos; skipped where the data set is absent."""

import pytest

from emo.data.scan import find_samples, scan_dataset
from emo.data.split import make_split
from emo.errors import DataError
from tests.conftest import EMOTION6

pytestmark = pytest.mark.skipif(not EMOTION6.is_dir(), reason="Emotion6 not present at ../shared/data/emotion6")


def test_scan_finds_all_photos():
    dataset = scan_dataset(EMOTION6, workers=2)
    assert dataset.classes == ["anger", "disgust", "fear", "joy", "sadness", "surprise"]
    assert len(dataset.samples) == 1212
    assert dataset.bad == []


def test_dominant_labels_include_neutral():
    _, samples, bad = find_samples(EMOTION6, labels_csv=EMOTION6 / "labels.csv", label_column="dominant_label")
    assert len(samples) == 1212
    assert bad == []
    assert "neutral" in {s.label for s in samples}


def test_dominant_label_anger_too_small_to_split():
    _, samples, _ = find_samples(EMOTION6, labels_csv=EMOTION6 / "labels.csv", label_column="dominant_label")
    with pytest.raises(DataError, match="class 'anger' has 17 image"):
        make_split([s.label for s in samples], seed=0)
