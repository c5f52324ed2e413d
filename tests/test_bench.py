"""Tiny runs of the benchmark scripts, so that they keep working; the timings are not checked."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, env=environment,
                          capture_output=True, text=True, timeout=600)


def run_bench(script: str, *args: str) -> str:
    result = run_script(script, *args)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_extract_bench_tiny_run():
    output = run_bench("extract.py", "--images", "8", "--image-size", "64", "--arch", "resnet18",
                       "--batch-size", "4", "--rss-images", "4", "--sweep", "1:0", "--distinct-photos", "3")
    assert output.startswith("### `emo extract`: 8 JPEGs of 500x375, resnet18, 64 px, batch 4, cpu")
    assert "| emo extract fp32 / ceiling fp32 |" in output
    assert "| emo extract fp32 / emo backbone alone fp32 |" in output
    assert "| emo extract bf16 / ceiling fp32 |" in output
    assert "| baseline fp32 |" in output
    assert "Smallest cosine similarity" in output
    assert "Peak resident memory of the `emo extract` process" in output
    assert "| 1 | 0 |" in output


def test_heads_bench_tiny_run():
    output = run_bench("heads.py", "--rows", "400", "--arch", "resnet18", "--epochs", "2", "--stack-epochs", "1",
                       "--max-memory", "256KB", "--stream-epochs", "2")
    assert output.startswith("### `emo fit-heads`: synthetic cache of 400 rows, 8 classes, resnet18 widths")
    assert "| fit-heads L4 time / LogisticRegression L4 time |" in output
    assert "| fit-heads --max-memory 256KB, 2 epochs |" in output
    assert "the streamed run's test metrics are identical to the in-memory run's" in output


def test_finetune_bench_tiny_run():
    output = run_bench("finetune.py", "--train-images", "8", "--arch", "resnet18", "--image-size", "32",
                       "--batch-size", "4", "--epochs", "2", "--variants", "fc", "--workers", "0")
    assert output.startswith("### `emo finetune`: 8 training JPEGs of 500x375, resnet18, 32 px, batch 4")
    assert "| emo finetune full / plain loop (images/s) |" in output
    assert "| emo finetune full / plain loop in channels-last (images/s) |" in output
    assert "| fc step / full step (seconds per image) |" in output
    assert "| emo finetune fc |" in output


@pytest.mark.parametrize(("args", "message"), [
    (["--variants", "fc,bogus"], "--variants: 'bogus' is not one of"),
    (["--train-images", "4", "--batch-size", "4"], "--train-images must be at least twice --batch-size (4)"),
    (["--epochs", "1"], "--epochs must be at least 2"),
    (["--batch-size", "1"], "batch_size must be at least 2, got 1"),
    (["--threads", "0"], "--threads must be at least 1, got 0"),
    (["--arch", "vgg16"], "unsupported architecture 'vgg16'"),
])
def test_finetune_bench_rejects_bad_options(args, message):
    result = run_script("finetune.py", *args)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--device", "tpu"], "--device: invalid device 'tpu'"),
    (["--distinct-photos", "0"], "--distinct-photos must be at least 1, got 0"),
    (["--precisions", "bf16"], "--precisions must include fp32"),
    (["--precisions", "fp32,fp16"], "--precisions: 'fp16' is not fp32 or bf16"),
    (["--images", "2"], "--images must be at least 3"),
    (["--rss-images", "2"], "--rss-images must be at least 3"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--threads", "0"], "--threads must be at least 1, got 0"),
    (["--sweep", "2-1"], "--sweep: '2-1' is not THREADS:WORKERS"),
])
def test_extract_bench_rejects_bad_options(args, message):
    result = run_script("extract.py", *args)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--max-memory", "abc"], "--max-memory: size 'abc' is not a number"),
    (["--rows", "20"], "--rows must be at least 160"),
    (["--separation", "-1"], "--separation must be above 0"),
    (["--arch", "vgg16"], "--arch: unsupported architecture 'vgg16'"),
    (["--rows", "400", "--arch", "resnet18", "--max-memory", "10GB"], "so nothing would be streamed"),
])
def test_heads_bench_rejects_bad_options(args, message):
    result = run_script("heads.py", *args)
    assert result.returncode != 0
    assert message in result.stderr


def test_extract_bench_dataset_rewritten_in_same_folder(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from extract import write_dataset
    from photos import write_photos

    photos = write_photos(tmp_path / "photos", 4)
    write_dataset(tmp_path / "data", photos)
    split_file = write_dataset(tmp_path / "data", photos[:3])
    assert sorted(path.name for path in (tmp_path / "data" / "photo").iterdir()) == [p.name for p in photos[:3]]
    assert len(split_file.read_text().splitlines()) == 4  # header and three rows
