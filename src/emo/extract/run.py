"""``emo extract``: scan, split, one frozen forward pass per batch, pooled rows into HDF5."""

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from emo.backbone import IMAGENET_MEAN, IMAGENET_STD, build_resnet, resolve_device
from emo.cache.schema import split_csv_path
from emo.cache.writer import CHUNK_ROWS, CacheWriter, check_destination
from emo.data.scan import Dataset, scan_dataset
from emo.data.split import make_split, read_split_csv, write_split_csv
from emo.data.transforms import resize_size
from emo.errors import CacheError, DataError
from emo.extract.config import ExtractConfig
from emo.extract.forward import cudnn_autotuning, inference_backbone, pooled_stages
from emo.extract.loading import default_workers, extraction_loader, normalize_batch
from emo.extract.precision import resolve_precision
from emo.extract.rows import RowBuffer
from emo.stages import stage_infos
from emo.threads import torch_threads

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractSummary:
    """Summary of an extraction: rows in total and written now, time, throughput and file size."""

    cache: Path
    split_csv: Path
    images: int
    written_now: int
    seconds: float
    bytes: int

    @property
    def images_per_second(self) -> float:
        """Rows written by this call per second of forward-pass loop."""
        return self.written_now / self.seconds if self.seconds > 0 else float("nan")


def extract(config: ExtractConfig) -> ExtractSummary:
    """Run a frozen ResNet over a dataset and write the pooled outputs of its five stages to HDF5.

    The output path is checked first, weights are loaded next and the dataset is scanned last,
    so a wrong ``--out``, a missing weights file or a bad image is reported before the forward
    passes start. An interrupted extraction resumes when the same command is run again.

    Args:
        config: the resolved options of ``emo extract``.

    Returns:
        An :class:`ExtractSummary`.

    Example:
        >>> extract(ExtractConfig(data=Path("emotion6"), out=Path("e6.h5"), weights="random"))  # doctest: +SKIP
    """
    device = resolve_device(config.device)
    check_destination(Path(config.out), overwrite=config.overwrite)
    precision = resolve_precision(config.precision, device)
    model, weights = build_resnet(config.arch, config.weights, seed=config.seed)
    # Scanning finishes before the forward pass starts, so it may use every core.
    dataset = scan_dataset(config.data, labels_csv=config.labels, path_column=config.path_column,
                           label_column=config.label_column, skip_bad=config.skip_bad, workers=os.cpu_count() or 1)
    split = _resolve_split(config, dataset)
    header = _cache_header(config, dataset, split, weights, precision)
    columns = {"labels": dataset.label_indices(), "split": split,
               "paths": [sample.relpath for sample in dataset.samples], "sha256": dataset.sha256}
    stages = {info.name: info.channels for info in stage_infos(config.arch)}

    split_csv = split_csv_path(Path(config.out))
    with CacheWriter(config.out, header=header, columns=columns, stages=stages, dtype=config.dtype,
                     overwrite=config.overwrite) as writer:
        pending = writer.pending_rows()
        start = time.perf_counter()
        _write_features(writer, model, dataset, pending, config, device=device, precision=precision)
        seconds = time.perf_counter() - start
        # The split file is written before the cache is finished, so a failure here leaves a
        # partial cache that the next identical command finishes without a forward pass.
        staged_split = _write_split_file(split_csv, dataset, split)
        writer.finish()
    os.replace(staged_split, split_csv)
    summary = ExtractSummary(Path(config.out), split_csv, len(dataset.samples), len(pending), seconds,
                             Path(config.out).stat().st_size)
    logger.info("extracted %d images (%d now) in %.1f s, %.1f images/s; cache %s is %.1f MB; split in %s",
                summary.images, summary.written_now, seconds, summary.images_per_second, summary.cache,
                summary.bytes / 1e6, split_csv)
    return summary


def _resolve_split(config: ExtractConfig, dataset: Dataset) -> list[str]:
    labels = [sample.label for sample in dataset.samples]
    if config.split_file is not None:
        return read_split_csv(config.split_file, [sample.relpath for sample in dataset.samples], labels=labels,
                              sha256=dataset.sha256, root=dataset.root)
    return make_split(labels, seed=config.seed)


def _cache_header(config: ExtractConfig, dataset: Dataset, split: list[str], weights, precision: str) -> dict:
    header = {
        "classes": dataset.classes, "arch": config.arch, "image_size": config.image_size,
        "resize_size": resize_size(config.image_size), "precision": precision,
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "weights": {"spec": weights.spec, "source": weights.source, "sha256": weights.sha256,
                    "seed": config.seed},
        "dataset_root": str(Path(dataset.root).resolve()), "label_column": config.label_column,
        "config": config.to_json(),
    }
    header["fingerprint_parts"] = _fingerprint_parts(header, dataset, split, config.dtype)
    header["fingerprint"] = _sha256_of_json(header["fingerprint_parts"])
    return header


def _fingerprint_parts(header: dict, dataset: Dataset, split: list[str], dtype: str) -> dict:
    """Collect everything that decides the content of the rows, so only an identical command resumes.

    Batch size, workers and device are left out, so a resume may change them. Rows computed with
    another batch size or device can differ in floating-point rounding.
    """
    parts = {key: header[key] for key in ("classes", "arch", "image_size", "precision", "normalization")}
    parts["weights_sha256"] = header["weights"]["sha256"]
    parts["dtype"] = dtype
    parts["rows"] = _sha256_of_json([[s.relpath, s.label, digest, part]
                                     for s, digest, part in zip(dataset.samples, dataset.sha256, split)])
    return parts


def _sha256_of_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _write_features(writer: CacheWriter, model: nn.Module, dataset: Dataset, pending: np.ndarray,
                    config: ExtractConfig, *, device: torch.device, precision: str) -> None:
    """Run the forward pass over the ``pending`` rows and write their pooled stage outputs.

    Loader workers decode the next batches while the backbone runs, and rows reach the file in
    blocks of whole chunks, so decoding and writing overlap the forward pass.

    NOTE: the CUDA path (pinned host memory, non-blocking copies, bf16 autocast, cuDNN
    autotuning) has not been run on a GPU yet, and JPEGs are always decoded on the CPU.
    """
    if not len(pending):
        return
    features = inference_backbone(model, device)
    paths = [dataset.path(i) for i in range(len(dataset.samples))]
    workers = config.workers if config.workers is not None else default_workers(device)
    loader = extraction_loader(paths, pending.tolist(), image_size=config.image_size,
                               batch_size=config.batch_size, workers=workers, device=device)
    buffer = RowBuffer(writer, block_rows=_block_rows(config.batch_size))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    with torch_threads(config.threads), cudnn_autotuning(device), torch.inference_mode(), autocast, \
            tqdm(total=len(pending), desc="extract", unit="img") as bar:
        for crops, rows, failures in loader:
            if any(failures):
                buffer.flush()
                _raise_on_failure(dataset, rows, failures, writer)
            buffer.add(rows, pooled_stages(features, normalize_batch(crops, device)))  # {stage: [B, C]}
            bar.update(len(rows))
        buffer.flush()


def _block_rows(batch_size: int) -> int:
    """Return the rows per cache write: whole batches that fill at least one HDF5 chunk."""
    return -(-CHUNK_ROWS // batch_size) * batch_size


def _raise_on_failure(dataset: Dataset, rows: torch.Tensor, failures: list[str], writer: CacheWriter) -> None:
    for row, failure in zip(rows.tolist(), failures):
        if failure:
            raise DataError(f"{dataset.path(row)}: {failure}. The file passed the scan but failed during "
                            f"extraction, so it changed or was removed meanwhile. Rows written so far are kept in "
                            f"{writer.partial}; restore the file and rerun the same command to resume, or pass "
                            "--overwrite to start over with the current files")


def _write_split_file(path: Path, dataset: Dataset, split: list[str]) -> Path:
    """Write the split CSV under a temporary name next to ``path`` and return that name."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        write_split_csv(temporary, relpaths=[s.relpath for s in dataset.samples],
                        labels=[s.label for s in dataset.samples], split=split, sha256=dataset.sha256)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise CacheError(f"writing split file {path} failed: {error}. The partial cache is kept; fix the cause "
                         "and rerun the same command to finish it") from error
    return temporary
