"""Images of a fine-tuning run: scanning and splitting the dataset, the split file, data loaders."""

import multiprocessing
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler

from emo.data.csvfile import read_csv_rows
from emo.data.dataset import ImageFiles
from emo.data.sampling import make_sampler
from emo.data.scan import Dataset, scan_dataset
from emo.data.split import SPLITS, make_split, read_split_csv, write_split_csv
from emo.data.transforms import eval_transform, resize_size, train_transform
from emo.errors import DataError, RunError
from emo.finetune.config import FinetuneConfig
from emo.finetune.distributed import Distributed, ShardedBatchSampler

SPLIT_FILE = "split.csv"
# Imported once by the forkserver, so that each new worker finds them loaded: what the dataset
# needs, and what a worker's rerun of the main script imports (emo.cli for the ``emo`` command,
# emo.finetune for a script that calls finetune()).
WORKER_PRELOAD = ["torch", "torchvision.transforms", "PIL.Image", "emo.cli", "emo.finetune"]


def worker_context(workers: int) -> multiprocessing.context.BaseContext | None:
    """Return the start method of the loader workers: forkserver where the platform has it.

    Forking the training process itself, as the default start method does on Linux, shares its
    gigabytes of heap with every new worker copy-on-write. Each epoch starts new workers, and
    the first mini-batch after that paid for copying every page it wrote (resnet101 at batch
    32 on 2 CPU cores: 25 s instead of 9 s). The forkserver forks from a small process instead.
    """
    if workers == 0 or "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)
    return context


def exit_with_training_process(worker_id: int) -> None:
    """Start a thread that ends this loader worker as soon as the training process exits.

    torch's workers (2.14, ``ManagerWatchdog`` in ``torch/utils/data/_utils/worker.py``) notice a
    dead parent by a change of ``os.getppid()``. A forkserver worker's parent is the forkserver,
    which CPython keeps running while any worker has the write end of its "alive" pipe open.
    So without this thread, a training process killed by SIGKILL or SIGTERM leaves the
    forkserver and its workers running for good. In a worker, ``multiprocessing.parent_process()``
    is the training process.
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def wait_then_exit() -> None:
        parent.join()
        os._exit(1)

    threading.Thread(target=wait_then_exit, name="exit-with-training-process", daemon=True).start()


@dataclass
class SplitImages:
    """Image files and class indices of one split."""

    paths: list[Path]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.paths)


def prepare_data(config: FinetuneConfig, *, split_file: Path | None) -> tuple[Dataset, list[str]]:
    """Scan the dataset and assign each sample to train, val or test.

    Args:
        config: the run's options (data, labels CSV, columns, seed, skip_bad, workers).
        split_file: a split CSV to follow; None makes a new stratified split with ``config.seed``.

    Returns:
        The scanned dataset and one split name per sample.
    """
    dataset = scan_dataset(config.data, labels_csv=config.labels, path_column=config.path_column,
                           label_column=config.label_column, skip_bad=config.skip_bad,
                           workers=max(config.workers, 1))
    if split_file is not None:
        split = read_split_csv(split_file, [sample.relpath for sample in dataset.samples])
    else:
        split = make_split([sample.label for sample in dataset.samples], seed=config.seed)
    _check_split(dataset, split)
    return dataset, split


def _check_split(dataset: Dataset, split: list[str]) -> None:
    labels = np.asarray(dataset.label_indices())
    parts = np.asarray(split)
    for part in SPLITS:
        if not (parts == part).any():
            raise DataError(f"the {part} split of {dataset.root} is empty; fine-tuning needs train, val and test images")
    train_counts = np.bincount(labels[parts == "train"], minlength=len(dataset.classes))
    if (train_counts == 0).any():
        missing = dataset.classes[int(np.flatnonzero(train_counts == 0)[0])]
        raise DataError(f"class {missing!r} has no training image; every class needs at least one")
    if (parts == "train").sum() < 2:
        raise DataError("fine-tuning needs at least two training images (BatchNorm needs two per batch)")


def split_images(dataset: Dataset, split: list[str], part: str) -> SplitImages:
    """Return the image files and class indices of one split."""
    labels = dataset.label_indices()
    rows = [index for index, name in enumerate(split) if name == part]
    return SplitImages([dataset.path(index) for index in rows], [labels[index] for index in rows])


def write_run_split(run_dir: Path, dataset: Dataset, split: list[str]) -> Path:
    """Write the run's split file (path, label, split, SHA-256 per sample) through a rename."""
    path = Path(run_dir) / SPLIT_FILE
    temporary = path.with_name(path.name + ".tmp")
    write_split_csv(temporary, relpaths=[sample.relpath for sample in dataset.samples],
                    labels=[sample.label for sample in dataset.samples], split=split, sha256=dataset.sha256)
    os.replace(temporary, path)
    return path


def read_run_split(run_dir: Path, root: Path, classes: list[str], part: str) -> SplitImages:
    """Read the images of one split from a finished run's split file.

    Raises:
        RunError: if the split file names a class the run does not have, or an image is missing.
    """
    lookup = {name: index for index, name in enumerate(classes)}
    paths, labels = [], []
    for row in read_csv_rows(Path(run_dir) / SPLIT_FILE, ["path", "label", "split"]):
        if row["split"].strip() != part:
            continue
        label = row["label"].strip()
        if label not in lookup:
            raise RunError(f"{run_dir}/{SPLIT_FILE} has label {label!r}, which is not a class of the run")
        paths.append(root / row["path"].strip())
        labels.append(lookup[label])
    missing = [path for path in paths if not path.is_file()]
    if missing:
        raise RunError(f"{len(missing)} image(s) of the run's {part} split are missing, e.g. {missing[0]}; "
                       f"the dataset is expected under {root}")
    return SplitImages(paths, labels)


class MergedTailBatchSampler(Sampler[list[int]]):
    """Mini-batches of ``batch_size`` indices where a last batch under ``min_size`` joins the batch before it.

    BatchNorm in training mode cannot normalize one value per channel, which a batch of one
    image gives wherever a feature map is 1x1 (layer4 at small image sizes). Under DDP each of
    W ranks gets a share of every batch, so ``min_size`` is 2 W there.

    Example:
        >>> [len(batch) for batch in MergedTailBatchSampler(range(9), 4)]
        [4, 5]
    """

    def __init__(self, sampler, batch_size: int, *, min_size: int = 2):
        self.sampler = sampler
        self.batch_size = batch_size
        self.min_size = min_size

    def __iter__(self):
        batches = list(BatchSampler(self.sampler, self.batch_size, drop_last=False))
        if len(batches) > 1 and len(batches[-1]) < self.min_size:
            last = batches.pop()
            batches[-1] = batches[-1] + last
        return iter(batches)

    def __len__(self) -> int:
        full, rest = divmod(len(self.sampler), self.batch_size)
        if rest == 0:
            return full
        return full + (rest >= self.min_size or full == 0)


def train_loader(images: SplitImages, config: FinetuneConfig, *, sampler_generator: torch.Generator,
                 loader_generator: torch.Generator, pin_memory: bool = False,
                 distributed: Distributed = Distributed()) -> DataLoader:
    """Return the training loader: random resized crops and flips, weighted or shuffled order.

    ``sampler_generator`` draws the order of the samples; ``loader_generator`` draws the base
    seed of the worker processes each epoch. Both belong to the run's checkpoint. Under DDP the
    loader yields this rank's share of each mini-batch.
    """
    sampler = make_sampler(np.asarray(images.labels), config.sampling, sampler_generator)
    dataset = ImageFiles(images.paths, images.labels, train_transform(config.image_size),
                         draft_size=resize_size(config.image_size))
    batches = MergedTailBatchSampler(sampler, config.batch_size, min_size=2 * distributed.world_size)
    if distributed.enabled:
        batches = ShardedBatchSampler(batches, distributed)
    return DataLoader(dataset, batch_sampler=batches, num_workers=config.workers, generator=loader_generator,
                      pin_memory=pin_memory, multiprocessing_context=worker_context(config.workers),
                      worker_init_fn=exit_with_training_process)


def eval_loader(images: SplitImages, *, image_size: int, batch_size: int, workers: int,
                pin_memory: bool = False) -> DataLoader:
    """Return a loader over ``images`` in order, with the evaluation transform of ``emo extract``."""
    dataset = ImageFiles(images.paths, images.labels, eval_transform(image_size), draft_size=resize_size(image_size))
    # Its own generator, so that evaluating never draws from the global RNG that training uses.
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      generator=torch.Generator().manual_seed(0), pin_memory=pin_memory,
                      multiprocessing_context=worker_context(workers), worker_init_fn=exit_with_training_process)
