"""Image batches for extraction: loader workers decode and crop, the main process normalizes.

Workers return uint8 crops [H, W, 3], a quarter of the bytes of float32 tensors to pass between
processes (and, with CUDA, to copy to the device). The main process converts a whole batch at
once, and the permuted [B, 3, H, W] view of [B, H, W, 3] memory is already channels-last, which
is the layout the backbone runs in.
"""

import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from emo.backbone import IMAGENET_MEAN, IMAGENET_STD
from emo.data.images import load_rgb
from emo.data.transforms import eval_crop, resize_size

# Batches each loader worker prepares ahead of the forward pass.
PREFETCH_BATCHES = 4
# Scheduling niceness added to loader workers on CPU: decoding then takes the cycles that the
# forward pass leaves idle rather than preempting its threads.
WORKER_NICENESS = 10


class CroppedImages(Dataset):
    """Images loaded upright in RGB, resized and centre-cropped as :func:`eval_transform` does.

    Items are ``(crop, index)``: the crop as uint8 [image_size, image_size, 3] and the sample index.
    """

    def __init__(self, paths: list, image_size: int):
        self.paths = list(paths)
        self.crop = eval_crop(image_size)
        self.draft_size = resize_size(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.crop(load_rgb(self.paths[index], draft_size=self.draft_size))
        return torch.from_numpy(np.array(image)), index


def normalize_batch(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Turn uint8 crops [B, H, W, 3] into normalized float32 images [B, 3, H, W] in channels-last layout.

    The arithmetic is that of ``ToTensor`` followed by ``Normalize`` in :func:`eval_transform`,
    so the values are the same.

    Example:
        >>> normalize_batch(torch.zeros(2, 32, 32, 3, dtype=torch.uint8), torch.device("cpu")).shape
        torch.Size([2, 3, 32, 32])
    """
    images = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return images.sub_(mean).div_(std)


def extraction_loader(paths: list, rows: list[int], *, image_size: int, batch_size: int, workers: int,
                      device: torch.device) -> DataLoader:
    """Return a loader of ``(crops, indices)`` batches over the samples ``rows`` of ``paths``, in order.

    Args:
        paths: the image file of every sample.
        rows: the sample indices to load, in increasing order.
        image_size: the crop size in pixels.
        batch_size: crops per batch.
        workers: loader worker processes; 0 decodes in the calling process.
        device: the device of the forward pass; CUDA gets pinned host memory.
    """
    options = {}
    if workers > 0:
        options = {"prefetch_factor": PREFETCH_BATCHES,
                   "worker_init_fn": _lower_priority if device.type == "cpu" else None}
    return DataLoader(Subset(CroppedImages(paths, image_size), rows), batch_size=batch_size, shuffle=False,
                      num_workers=workers, pin_memory=device.type == "cuda", **options)


def _lower_priority(worker_id: int) -> None:
    os.nice(WORKER_NICENESS)
