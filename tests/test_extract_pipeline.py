"""The pieces of the extraction hot path: batch normalization, BatchNorm folding, row blocks, precision."""

import logging

import h5py
import numpy as np
import pytest
import torch

from emo.backbone import StageFeatures, build_resnet
from emo.cache import FeatureCache
from emo.cache.writer import CacheWriter
from emo.data.images import load_rgb
from emo.data.transforms import eval_transform, resize_size
from emo.extract import extract
from emo.extract.forward import fold_batch_norms, inference_backbone, pooled_stages
from emo.extract.loading import CroppedImages, default_workers, extraction_loader, normalize_batch
from emo.extract.precision import read_cpu_flags, resolve_precision
from emo.extract.rows import RowBuffer
from emo.threads import torch_threads
from tests.conftest import tiny_extract_config

CPU = torch.device("cpu")


def test_normalized_crops_equal_eval_transform(image_folder):
    paths = sorted(image_folder.glob("*/*.jpg"))[:3]
    crops = torch.stack([CroppedImages(paths, 32)[i][0] for i in range(3)])
    expected = torch.stack([eval_transform(32)(load_rgb(p, draft_size=resize_size(32))) for p in paths])
    images = normalize_batch(crops, CPU)
    assert torch.equal(images, expected)
    assert images.is_contiguous(memory_format=torch.channels_last)


def test_loader_yields_uint8_crops_and_rows(image_folder):
    paths = sorted(image_folder.glob("*/*.jpg"))
    batches = list(extraction_loader(paths, [2, 5, 7], image_size=32, batch_size=2, workers=0, device=CPU))
    assert [rows.tolist() for _, rows, _ in batches] == [[2, 5], [7]]
    assert [list(failures) for _, _, failures in batches] == [["", ""], [""]]
    assert batches[0][0].dtype == torch.uint8
    assert batches[0][0].shape == (2, 32, 32, 3)


def test_loader_workers_give_same_batches(image_folder):
    paths = sorted(image_folder.glob("*/*.jpg"))[:6]
    alone = list(extraction_loader(paths, list(range(6)), image_size=32, batch_size=4, workers=0, device=CPU))
    pooled = list(extraction_loader(paths, list(range(6)), image_size=32, batch_size=4, workers=1, device=CPU))
    for (first, _, _), (second, _, _) in zip(alone, pooled, strict=True):
        assert torch.equal(first, second)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_folded_batch_norms_keep_outputs(arch):
    model, _ = build_resnet(arch, "random", seed=1)
    # Non-trivial running statistics, so that folding has something to fold.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected = StageFeatures(model)(images)
        folded = pooled_stages(inference_backbone(model, CPU), images.contiguous(memory_format=torch.channels_last))
    for name, values in expected.items():
        torch.testing.assert_close(folded[name], values, rtol=1e-4, atol=1e-4 * values.abs().max().item())


def test_folding_replaces_every_batch_norm():
    model, _ = build_resnet("resnet50", "random")
    fold_batch_norms(model)
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in model.modules())


def test_folding_rejects_training_mode():
    model, _ = build_resnet("resnet18", "random")
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(model.train())


def test_pooled_stages_are_float32_under_bf16():
    model, _ = build_resnet("resnet18", "random")
    features = inference_backbone(model, CPU)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = pooled_stages(features, torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    assert {values.dtype for values in pooled.values()} == {torch.float32}


def _writer(tmp_path, rows: int) -> CacheWriter:
    header = {"fingerprint": "test", "classes": ["a"]}
    columns = {"labels": [0] * rows, "split": ["train"] * rows, "paths": [f"{i}.jpg" for i in range(rows)],
               "sha256": [""] * rows}
    return CacheWriter(tmp_path / "c.h5", header=header, columns=columns, stages={"L0": 2}, dtype="float32")


def test_row_buffer_writes_whole_blocks(tmp_path):
    with _writer(tmp_path, 10) as writer:
        buffer = RowBuffer(writer, block_rows=4)
        buffer.add(torch.arange(0, 3), {"L0": torch.ones(3, 2)})
        assert len(writer.pending_rows()) == 10
        buffer.add(torch.arange(3, 6), {"L0": torch.full((3, 2), 2.0)})
        assert writer.pending_rows().tolist() == [6, 7, 8, 9]
        buffer.add(torch.arange(6, 10), {"L0": torch.full((4, 2), 3.0)})
        buffer.flush()
        assert len(writer.pending_rows()) == 0
        written = writer.file["features"]["L0"][:, 0].tolist()
    assert written == [1, 1, 1, 2, 2, 2, 3, 3, 3, 3]


def test_row_buffer_rejects_empty_blocks(tmp_path):
    with _writer(tmp_path, 1) as writer:
        with pytest.raises(ValueError, match="block_rows must be at least 1"):
            RowBuffer(writer, block_rows=0)


@pytest.mark.parametrize("precision, flags, expected", [
    ("auto", {"avx2", "avx512_bf16"}, "bf16"),
    ("auto", {"avx2", "amx_bf16"}, "bf16"),
    ("auto", {"avx2", "avx512f"}, "fp32"),
    ("auto", set(), "fp32"),
    ("fp32", {"avx512_bf16"}, "fp32"),
    ("bf16", {"avx512_bf16"}, "bf16"),
])
def test_precision_resolution_on_cpu(precision, flags, expected):
    assert resolve_precision(precision, CPU, cpu_flags=frozenset(flags)) == expected


@pytest.mark.parametrize("capability, expected", [((8, 0), "bf16"), ((9, 0), "bf16"), ((7, 5), "fp32")])
def test_precision_resolution_on_cuda(capability, expected):
    assert resolve_precision("auto", torch.device("cuda"), cuda_capability=capability) == expected


def test_emulated_bf16_is_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="emo.extract.precision"):
        assert resolve_precision("bf16", CPU, cpu_flags=frozenset({"avx2"})) == "bf16"
    assert "emulated" in caplog.text


def test_unknown_precision_is_rejected():
    with pytest.raises(ValueError, match="precision 'fp16' is not one of auto, fp32, bf16"):
        resolve_precision("fp16", CPU)


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert read_cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16"}


def test_cpu_flags_empty_without_cpuinfo(tmp_path):
    assert read_cpu_flags(tmp_path / "missing") == frozenset()


def test_auto_precision_is_resolved_in_cache(image_folder, tmp_path):
    out = tmp_path / "auto.h5"
    extract(tiny_extract_config(image_folder, out, precision="auto"))
    with FeatureCache(out) as cache:
        assert cache.attrs["precision"] == resolve_precision("auto", CPU)


def test_precision_changes_fingerprint(image_folder, tmp_path):
    fingerprints = []
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.h5"
        extract(tiny_extract_config(image_folder, out, precision=precision))
        with h5py.File(out, "r") as file:
            fingerprints.append(file.attrs["fingerprint"])
    assert fingerprints[0] != fingerprints[1]


def test_torch_threads_restores_count():
    before = torch.get_num_threads()
    with torch_threads(1) as inside:
        assert inside == 1
    assert torch.get_num_threads() == before


def test_torch_threads_rejects_zero():
    with pytest.raises(ValueError, match="at least 1"):
        with torch_threads(0):
            pass


def test_extraction_with_workers_equals_without(image_folder, tmp_path):
    alone, pooled = tmp_path / "alone.h5", tmp_path / "pooled.h5"
    extract(tiny_extract_config(image_folder, alone, workers=0))
    extract(tiny_extract_config(image_folder, pooled, workers=2, threads=1))
    with FeatureCache(alone) as first, FeatureCache(pooled) as second:
        np.testing.assert_array_equal(first.features("L4"), second.features("L4"))


@pytest.mark.parametrize("device, cores, expected", [
    ("cpu", 1, 1), ("cpu", 2, 1), ("cpu", 16, 2), ("cuda", 1, 1), ("cuda", 16, 15),
])
def test_default_workers_follow_device_and_cores(device, cores, expected):
    assert default_workers(torch.device(device), cores=cores) == expected


def test_config_rejects_negative_workers(image_folder, tmp_path):
    with pytest.raises(ValueError, match="workers must be 0 or more, got -1"):
        tiny_extract_config(image_folder, tmp_path / "c.h5", workers=-1)


def test_config_rejects_zero_threads(image_folder, tmp_path):
    with pytest.raises(ValueError, match="threads must be at least 1, got 0"):
        tiny_extract_config(image_folder, tmp_path / "c.h5", threads=0)
