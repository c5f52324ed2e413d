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
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from emo.backbone import IMAGENET_MEAN, IMAGENET_STD, StageFeatures, build_resnet, resolve_device
from emo.cache.schema import split_csv_path
from emo.cache.writer import CacheWriter, check_destination
from emo.data.dataset import ImageFiles, ImageFilesWithFailures
from emo.data.scan import Dataset, scan_dataset
from emo.data.split import make_split, read_split_csv, write_split_csv
from emo.data.transforms import eval_transform, resize_size
from emo.errors import CacheError, DataError
from emo.extract.config import ExtractConfig
from emo.stages import stage_infos

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
    model, weights = build_resnet(config.arch, config.weights, seed=config.seed)
    dataset = scan_dataset(config.data, labels_csv=config.labels, path_column=config.path_column,
                           label_column=config.label_column, skip_bad=config.skip_bad, workers=max(config.workers, 1))
    split = _resolve_split(config, dataset)
    header = _cache_header(config, dataset, split, weights)
    columns = {"labels": dataset.label_indices(), "split": split,
               "paths": [sample.relpath for sample in dataset.samples], "sha256": dataset.sha256}
    stages = {info.name: info.channels for info in stage_infos(config.arch)}

    split_csv = split_csv_path(Path(config.out))
    with CacheWriter(config.out, header=header, columns=columns, stages=stages, dtype=config.dtype,
                     overwrite=config.overwrite) as writer:
        pending = writer.pending_rows()
        start = time.perf_counter()
        _write_features(writer, StageFeatures(model), dataset, pending, config, device)
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


def _cache_header(config: ExtractConfig, dataset: Dataset, split: list[str], weights) -> dict:
    header = {
        "classes": dataset.classes, "arch": config.arch, "image_size": config.image_size,
        "resize_size": resize_size(config.image_size), "precision": config.precision,
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


def _write_features(writer: CacheWriter, features: StageFeatures, dataset: Dataset, pending: np.ndarray,
                    config: ExtractConfig, device: torch.device) -> None:
    if not len(pending):
        return
    features = features.to(device, memory_format=torch.channels_last).eval()
    images = ImageFilesWithFailures(ImageFiles([dataset.path(i) for i in range(len(dataset.samples))],
                                               dataset.label_indices(), eval_transform(config.image_size),
                                               draft_size=resize_size(config.image_size)),
                                    image_size=config.image_size)
    # Rows are written in order and flagged a whole batch at a time, so the pending rows of a
    # resumed run start on a batch boundary. With the same --batch-size, every image then lands
    # in the same batch as in an uninterrupted run, which matters because CPU convolutions can
    # round differently for another batch size.
    loader = DataLoader(Subset(images, pending.tolist()), batch_size=config.batch_size, shuffle=False,
                        num_workers=config.workers, pin_memory=device.type == "cuda",
                        persistent_workers=False)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")

    with torch.inference_mode(), autocast, tqdm(total=len(pending), desc="extract", unit="img") as bar:
        for batch, _, rows, failures in loader:
            _raise_on_failure(dataset, rows, failures, writer)
            batch = batch.to(device, non_blocking=True, memory_format=torch.channels_last)
            pooled = features(batch)  # {stage: [B, C]}
            writer.write(rows.numpy(), {name: value.float().cpu().numpy() for name, value in pooled.items()})
            bar.update(len(rows))


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
