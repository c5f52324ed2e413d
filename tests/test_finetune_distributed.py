"""``emo finetune`` under torchrun: two CPU processes with DDP over gloo."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import emo
from emo.finetune.data import MergedTailBatchSampler
from emo.finetune.distributed import Distributed, ShardedBatchSampler

SOURCE_ROOT = Path(emo.__file__).resolve().parents[1]


def test_sharded_batches_split_each_batch():
    batches = MergedTailBatchSampler(range(11), 4, min_size=4)
    shards = [list(ShardedBatchSampler(batches, Distributed(rank=rank, world_size=2))) for rank in (0, 1)]
    assert [len(batch) for batch in batches] == [4, 7]
    assert shards[0] == [[0, 2], [4, 6, 8, 10]]
    assert shards[1] == [[1, 3], [5, 7, 9]]
    assert len(ShardedBatchSampler(batches, Distributed(rank=1, world_size=2))) == 2


def test_batch_size_too_small_for_processes(ft_images, tmp_path, monkeypatch):
    from emo.finetune import FinetuneConfig, finetune

    monkeypatch.setenv("WORLD_SIZE", "2")
    config = FinetuneConfig(data=ft_images, variant="fc", out=tmp_path / "run", batch_size=3, arch="resnet18",
                            weights="random", image_size=32, workers=0, device="cpu")
    with pytest.raises(ValueError, match="batch_size 3 gives fewer than 2 images to some of the 2 processes"):
        finetune(config)


def test_torchrun_two_processes(ft_images, tmp_path):
    run_dir = tmp_path / "run"
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SOURCE_ROOT),
                                                                             os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "emo.cli", "finetune", str(ft_images), "--variant", "ensemble", "--out", str(run_dir),
               "--arch", "resnet18", "--weights", "random", "--image-size", "32", "--batch-size", "16",
               "--epochs", "1", "--stack-epochs", "1", "--workers", "0", "--device", "cpu"]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    # Rank 1 prints and logs nothing, so every line of rank 0 appears once.
    assert result.stdout.count("run written to") == 1
    assert result.stderr.count("fine-tuning ResNet-ensemble") == 1
    assert "2 processes" in result.stderr
    assert result.stderr.count("step2, epoch 1/1: loss") == 1

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["primary"] == "ResNet-ensemble"
    assert [json.loads(line)["step"] for line in (run_dir / "history.jsonl").read_text().splitlines()] == \
        ["step1", "step2"]
