from collections import Counter

import pytest

from emo.data.split import MIN_PER_CLASS, make_split, read_split_csv, write_split_csv
from emo.errors import DataError


def test_split_fractions_are_80_5_15():
    labels = ["a"] * 100 + ["b"] * 100
    counts = Counter(make_split(labels, seed=0))
    assert counts == {"train": 160, "val": 10, "test": 30}


def test_split_is_stratified():
    labels = ["a"] * 40 + ["b"] * 160
    split = make_split(labels, seed=1)
    per_class = Counter(zip(labels, split))
    assert per_class[("a", "test")] == 6
    assert per_class[("b", "test")] == 24
    assert per_class[("a", "val")] == 2
    assert per_class[("b", "val")] == 8


def test_split_repeats_with_seed_and_changes_without():
    labels = ["a"] * 30 + ["b"] * 30
    assert make_split(labels, seed=3) == make_split(labels, seed=3)
    assert make_split(labels, seed=3) != make_split(labels, seed=4)


def test_every_class_in_every_split_at_minimum_size():
    labels = ["a"] * MIN_PER_CLASS + ["b"] * MIN_PER_CLASS + ["c"] * 97
    split = make_split(labels, seed=0)
    assert {(label, part) for label, part in zip(labels, split)} >= {(c, s) for c in "abc" for s in ("train", "val", "test")}


def test_small_class_is_named_with_count_and_minimum():
    labels = ["anger"] * 17 + ["joy"] * 40
    with pytest.raises(DataError, match=f"class 'anger' has 17 image\\(s\\).*at least {MIN_PER_CLASS}"):
        make_split(labels, seed=0)


def test_split_file_round_trip(tmp_path):
    relpaths = [f"x/{i}.jpg" for i in range(40)]
    labels = ["a"] * 20 + ["b"] * 20
    split = make_split(labels, seed=0)
    path = tmp_path / "split.csv"
    write_split_csv(path, relpaths=relpaths, labels=labels, split=split, sha256=["0" * 64] * 40)
    assert read_split_csv(path, list(reversed(relpaths))) == list(reversed(split))
    assert path.read_text().splitlines()[0] == "path,label,split,sha256"


def test_split_file_missing_sample(tmp_path):
    path = tmp_path / "split.csv"
    write_split_csv(path, relpaths=["a.jpg"], labels=["a"], split=["train"], sha256=[""])
    with pytest.raises(DataError, match="no row for 1 sample.*'b.jpg'"):
        read_split_csv(path, ["a.jpg", "b.jpg"])


def test_split_file_unknown_split_name(tmp_path):
    path = tmp_path / "split.csv"
    write_split_csv(path, relpaths=["a.jpg"], labels=["a"], split=["holdout"], sha256=[""])
    with pytest.raises(DataError, match="split 'holdout' is not one of train, val, test"):
        read_split_csv(path, ["a.jpg"])
