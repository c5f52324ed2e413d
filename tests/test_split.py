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


def three_class_split(tmp_path, **changes):
    """Write a valid split file of 3 classes x 20 samples; ``changes`` maps a row index to new fields."""
    relpaths = [f"{label}/{i}.jpg" for label in "abc" for i in range(20)]
    labels = [relpath[0] for relpath in relpaths]
    split = make_split(labels, seed=0)
    digests = [f"{i:064x}" for i in range(len(relpaths))]
    path = tmp_path / "split.csv"
    write_split_csv(path, relpaths=relpaths, labels=labels, split=split, sha256=digests)
    return path, relpaths, labels, split, digests


def rewrite_rows(path, edit):
    """Apply ``edit`` to every data row (a list of fields) of a split file and write it back."""
    lines = path.read_text().splitlines()
    rows = [line.split(",") for line in lines[1:]]
    path.write_text("\n".join([lines[0], *(",".join(edit(row)) for row in rows)]) + "\n")


@pytest.mark.parametrize("part", ["val", "test", "train"])
def test_split_file_without_a_split_rejected(tmp_path, part):
    path, relpaths, labels, _, _ = three_class_split(tmp_path)
    other = "train" if part != "train" else "test"
    rewrite_rows(path, lambda row: [*row[:2], other if row[2] == part else row[2], row[3]])
    with pytest.raises(DataError, match=f"puts no image of class 'a' in the {part} split"):
        read_split_csv(path, relpaths, labels=labels)


def test_split_file_checks_every_class(tmp_path):
    path, relpaths, labels, _, _ = three_class_split(tmp_path)
    rewrite_rows(path, lambda row: [*row[:2], "train" if row[1] == "b" and row[2] == "val" else row[2], row[3]])
    with pytest.raises(DataError, match="class 'b' in the val split"):
        read_split_csv(path, relpaths, labels=labels)


def test_split_file_changed_sha256_names_row_and_file(tmp_path):
    path, relpaths, labels, _, digests = three_class_split(tmp_path)
    changed = list(digests)
    changed[5] = "f" * 64
    with pytest.raises(DataError) as error:
        read_split_csv(path, relpaths, labels=labels, sha256=changed, root=tmp_path)
    message = str(error.value)
    assert f"{path}, line 7:" in message
    assert str(tmp_path / "a" / "5.jpg") in message
    assert "changed since the split was made" in message


def test_split_file_matching_sha256_accepted(tmp_path):
    path, relpaths, labels, split, digests = three_class_split(tmp_path)
    assert read_split_csv(path, relpaths, labels=labels, sha256=digests) == split


def test_split_file_row_for_missing_file(tmp_path):
    path, relpaths, labels, _, _ = three_class_split(tmp_path)
    for relpath in relpaths:
        (tmp_path / relpath).parent.mkdir(exist_ok=True)
        (tmp_path / relpath).touch()
    with open(path, "a") as file:
        file.write("a/gone.jpg,a,train,\n")
    with pytest.raises(DataError, match="line 62: 'a/gone.jpg' does not exist in"):
        read_split_csv(path, relpaths, labels=labels, root=tmp_path)


def test_split_file_row_for_existing_unused_file_ignored(tmp_path):
    path, relpaths, labels, split, _ = three_class_split(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "skipped.jpg").touch()
    with open(path, "a") as file:
        file.write("a/skipped.jpg,a,train,\n")
    assert read_split_csv(path, relpaths, labels=labels, root=tmp_path) == split


def test_split_file_paths_are_normalized(tmp_path):
    path, relpaths, labels, split, _ = three_class_split(tmp_path)
    rewrite_rows(path, lambda row: ["./" + row[0].replace("/", "//"), *row[1:]])
    assert read_split_csv(path, relpaths, labels=labels) == split
