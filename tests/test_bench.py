"""Tiny runs of the benchmark scripts, so that they keep working; the timings are not checked."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def run_bench(script: str, *args: str) -> str:
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=ROOT, env=environment,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_extract_bench_tiny_run():
    output = run_bench("extract.py", "--images", "8", "--image-size", "64", "--arch", "resnet18",
                       "--batch-size", "4", "--rss-images", "4", "--sweep", "1:0")
    assert output.startswith("### `emo extract`: 8 JPEGs of 500x375, resnet18, 64 px, batch 4")
    assert "| emo extract fp32 / ceiling fp32 |" in output
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
