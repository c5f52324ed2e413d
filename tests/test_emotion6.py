"""Checks on the real Emotion6 photos; skipped where the data set is absent."""

import numpy as np
import pytest

from emo.cache import FeatureCache
from emo.data.scan import find_samples, scan_dataset
from emo.data.split import make_split
from emo.errors import DataError
from emo.extract import ExtractConfig, extract
from emo.stages import STAGE_NAMES
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


def test_bf16_rows_close_to_fp32(tmp_path):
    # Three photos per class (one per split), resnet50 with random weights (ImageNet weights need
    # a download): random convolutions still give every stage non-trivial activations to compare.
    photos = [f"{label}/{path.name}" for label in ("anger", "disgust", "fear", "joy", "sadness", "surprise")
              for path in sorted((EMOTION6 / label).glob("*.jpg"))[:3]]
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"{photo},{photo.split('/')[0]}\n" for photo in photos))
    split = tmp_path / "split.csv"
    split.write_text("path,split\n" + "".join(f"{photo},{('train', 'val', 'test')[index % 3]}\n"
                                              for index, photo in enumerate(photos)))
    caches = {}
    for precision in ("fp32", "bf16"):
        caches[precision] = tmp_path / f"{precision}.h5"
        extract(ExtractConfig(data=EMOTION6, labels=labels, split_file=split, out=caches[precision], weights="random",
                              arch="resnet50", image_size=224, batch_size=6, workers=0, device="cpu",
                              dtype="float32", precision=precision))

    with FeatureCache(caches["fp32"]) as reference, FeatureCache(caches["bf16"]) as reduced:
        assert reduced.attrs["precision"] == "bf16"
        for stage in STAGE_NAMES:
            exact, approximate = reference.features(stage), reduced.features(stage)
            cosine = (exact * approximate).sum(1) / (np.linalg.norm(exact, axis=1) * np.linalg.norm(approximate, axis=1))
            assert cosine.min() >= 0.999, (stage, cosine.min())
