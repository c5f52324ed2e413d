"""Training rows of the heads: block reads, statistics, streaming within a memory budget."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from emo.cache import FeatureCache
from emo.cache.synthetic import write_synthetic_cache
from emo.cli import main
from emo.heads import FitHeadsConfig, fit_heads
from emo.heads.data import InMemoryRows, StageColumns, StreamedRows, column_statistics, read_matrix
from emo.units import parse_bytes

# resnet18 widths: 64 + 64 + 128 + 256 + 512 = 1024 float32 columns, 4 KiB per row.
ROW_BYTES = 4096


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A synthetic resnet18-width cache of 600 rows, 4 classes."""
    return write_synthetic_cache(tmp_path_factory.mktemp("rows") / "rows.h5", rows=600, classes=list("abcd"),
                                 arch="resnet18", separation=1.0, seed=2)


def test_read_rows_equals_h5py_selection(cache):
    with FeatureCache(cache) as opened:
        rows = opened.indices("val")
        expected = opened._file["features"]["L3"][rows].astype(np.float32)
        np.testing.assert_array_equal(opened.read_rows("L3", rows), expected)


def test_read_rows_fills_column_slice(cache):
    with FeatureCache(cache) as opened:
        out = np.zeros((3, 300), dtype=np.float32)
        opened.read_rows("L2", np.array([1, 2, 500]), out=out[:, 10:138])
        expected = opened._file["features"]["L2"][[1, 2, 500]].astype(np.float32)
    np.testing.assert_array_equal(out[:, 10:138], expected)
    assert not out[:, :10].any()


def test_read_rows_of_nothing(cache):
    with FeatureCache(cache) as opened:
        assert opened.read_rows("L4", np.array([], dtype=np.int64)).shape == (0, 512)


def test_matrix_columns_follow_stage_order(cache):
    columns = StageColumns.of({"L1": 64, "L4": 512})
    with FeatureCache(cache) as opened:
        rows = opened.indices("test")
        matrix = read_matrix(opened, rows, columns)
        np.testing.assert_array_equal(matrix[:, 64:], opened.features("L4", "test"))
    assert columns.spans == {"L1": (0, 64), "L4": (64, 512)}


def test_column_statistics_match_numpy():
    values = np.random.default_rng(0).normal(1000.0, 2.0, size=(1000, 3)).astype(np.float32)
    mean, std = column_statistics(values[i:i + 300] for i in range(0, 1000, 300))
    np.testing.assert_allclose(mean.numpy(), values.astype(np.float64).mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(std.numpy(), values.astype(np.float64).std(axis=0, ddof=1), rtol=1e-4)


def test_column_statistics_need_two_rows():
    with pytest.raises(ValueError, match="at least 2 training rows"):
        column_statistics(iter([np.ones((1, 3), dtype=np.float32)]))


def _rows(cache, window_rows):
    columns = StageColumns.of({"L2": 128, "L4": 512})
    with FeatureCache(cache) as opened:
        rows = opened.indices("train")
        labels = torch.from_numpy(opened.labels("train")).long()
        matrix = torch.from_numpy(read_matrix(opened, rows, columns))
    return InMemoryRows(matrix, labels, columns), StreamedRows(cache, rows, labels, columns, window_rows=window_rows)


def test_streamed_batches_equal_in_memory(cache):
    in_memory, streamed = _rows(cache, window_rows=70)
    order = torch.randperm(len(in_memory.labels), generator=torch.Generator().manual_seed(0)).split(32)
    with in_memory, streamed:
        pairs = list(zip(in_memory.batches(order), streamed.batches(order), strict=True))
    for (features, labels), (streamed_features, streamed_labels) in pairs:
        assert torch.equal(labels, streamed_labels)
        for name in features:
            assert torch.equal(features[name], streamed_features[name])


def test_standardized_batches_equal_standardizing_each_batch(cache):
    raw, _ = _rows(cache, window_rows=70)
    in_memory, streamed = _rows(cache, window_rows=70)
    mean, std = torch.linspace(-1.0, 1.0, 640), torch.linspace(0.5, 2.0, 640)
    in_memory.standardize(mean, std)
    streamed.standardize(mean, std)
    order = torch.randperm(len(raw.labels), generator=torch.Generator().manual_seed(1)).split(32)
    with raw, in_memory, streamed:
        triples = list(zip(raw.batches(order), in_memory.batches(order), streamed.batches(order), strict=True))
    spans = raw.columns.spans
    for (features, _), (standardized, _), (streamed_features, _) in triples:
        for name, (start, width) in spans.items():
            expected = (features[name] - mean[start:start + width]) / std[start:start + width]
            assert torch.equal(standardized[name], expected)
            assert torch.equal(streamed_features[name], expected)
    assert in_memory.standardized
    assert streamed.standardized
    assert not raw.standardized


def test_statistics_of_standardized_rows_are_refused(cache):
    in_memory, _ = _rows(cache, window_rows=70)
    in_memory.standardize(torch.zeros(640), torch.ones(640))
    with pytest.raises(RuntimeError, match="before they are standardized"):
        in_memory.statistics("L4")


def test_streamed_statistics_equal_in_memory(cache):
    in_memory, streamed = _rows(cache, window_rows=64)
    for first, second in zip(in_memory.statistics("L4"), streamed.statistics("L4"), strict=True):
        assert torch.equal(first, second)


def test_streamed_batches_need_open_cache(cache):
    _, streamed = _rows(cache, window_rows=64)
    with pytest.raises(RuntimeError, match="context manager"):
        next(streamed.batches([torch.arange(4)]))


def test_max_memory_streaming_repeats_in_memory_run(cache, tmp_path):
    options = dict(cache=cache, epochs=3, stack_epochs=2, seed=5, dropout=0.2)
    in_memory = fit_heads(FitHeadsConfig(out=tmp_path / "memory", **options))
    # 20 rows of 4 KiB per window: every epoch of 480 training rows reads the file many times.
    streamed = fit_heads(FitHeadsConfig(out=tmp_path / "streamed", max_memory=40 * ROW_BYTES, **options))
    assert streamed["models"] == in_memory["models"]
    first, second = torch.load(tmp_path / "memory" / "model.pt"), torch.load(tmp_path / "streamed" / "model.pt")
    for name, values in first.items():
        assert torch.equal(values, second[name]), name


def test_max_memory_streaming_logs_window(cache, tmp_path, caplog):
    with caplog.at_level("INFO", logger="emo.heads.train"):
        fit_heads(FitHeadsConfig(cache=cache, out=tmp_path / "run", epochs=1, stack_epochs=0, stages=("L4",),
                                 max_memory=100_000))
    assert "streaming them from" in caplog.text


def test_max_memory_below_one_batch_is_rejected(cache, tmp_path):
    with pytest.raises(ValueError, match="fewer than one batch of 32; raise --max-memory"):
        fit_heads(FitHeadsConfig(cache=cache, out=tmp_path / "run", epochs=1, max_memory=10 * ROW_BYTES))


@pytest.mark.parametrize("options, message", [
    ({"max_memory": 0}, "--max-memory must be a positive number of bytes"),
    ({"threads": 0}, "--threads must be at least 1"),
])
def test_config_rejects_bad_budget_and_threads(options, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        FitHeadsConfig(cache=tmp_path / "c.h5", out=tmp_path / "r", **options)


@pytest.mark.parametrize("text, expected", [
    ("2GB", 2 * 10**9), ("512MiB", 512 * 2**20), ("1.5kib", 1536), ("100", 100), ("3e6 B", 3_000_000),
])
def test_parse_bytes_units(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "2 parsecs", "-1MB", "0"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError, match="size"):
        parse_bytes(text)


def test_cli_max_memory_reaches_config(cache, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["fit-heads", str(cache), "--out", str(out), "--epochs", "1",
                                       "--stages", "L4", "--max-memory", "200kB", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["config"]["max_memory"] == 200_000


def test_cli_rejects_bad_max_memory(cache, tmp_path):
    result = CliRunner().invoke(main, ["fit-heads", str(cache), "--out", str(tmp_path / "r"), "--max-memory", "lots"])
    assert result.exit_code == 2
    assert "size 'lots' is not a number" in result.output
