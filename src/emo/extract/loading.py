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
from emo.data.images import BadImageError, load_rgb
from emo.data.transforms import eval_crop, resize_size

# Batches each loader worker prepares ahead of the forward pass.
PREFETCH_BATCHES = 4
# CPU cores per loader worker when the forward pass runs on the CPU. Decoding and cropping a
# 500x375 JPEG costs about 1/20 of the CPU time of a ResNet-101 forward pass at 224 px in fp32,
# and about 1/12 in bf16. These are estimates from one 2-core AMD EPYC with AVX512-BF16 and
# torch 2.14. One worker per 8 cores therefore keeps up with a margin.
CORES_PER_CPU_WORKER = 8


class CroppedImages(Dataset):
    """Images loaded upright in RGB, resized and centre-cropped as :func:`eval_transform` does.

    Items are ``(crop, index, failure)``: the crop as uint8 [image_size, image_size, 3], the sample
    index and "" for a good file. A file that passed the scan can still fail later (changed or
    deleted meanwhile). Its item then has a zero crop and the reason as ``failure``, because a
    worker's exception would reach the main process as a generic RuntimeError without it.
    """

    def __init__(self, paths: list, image_size: int):
        self.paths = list(paths)
        self.image_size = image_size
        self.crop = eval_crop(image_size)
        self.draft_size = resize_size(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            image = self.crop(load_rgb(self.paths[index], draft_size=self.draft_size))
        except BadImageError as error:
            return self._blank(), index, error.reason
        except OSError as error:
            return self._blank(), index, f"cannot read ({error.strerror or error})"
        return torch.from_numpy(np.array(image)), index, ""

    def _blank(self) -> torch.Tensor:
        return torch.zeros(self.image_size, self.image_size, 3, dtype=torch.uint8)


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


def default_workers(device: torch.device, cores: int | None = None) -> int:
    """Return the loader workers that keep the forward pass on ``device`` fed.

    On a GPU, decoding on the CPU is the limit, so every core but the one that drives the GPU
    decodes. On the CPU, decoding is a small share of the work, so one worker per
    ``CORES_PER_CPU_WORKER`` cores (at least one) overlaps it with the forward pass.

    Example:
        >>> default_workers(torch.device("cpu"), cores=2), default_workers(torch.device("cuda"), cores=16)
        (1, 15)
    """
    cores = cores or os.cpu_count() or 1
    if device.type == "cuda":
        return max(1, cores - 1)
    return max(1, cores // CORES_PER_CPU_WORKER)


def extraction_loader(paths: list, rows: list[int], *, image_size: int, batch_size: int, workers: int,
                      device: torch.device) -> DataLoader:
    """Return a loader of ``(crops, indices, failures)`` batches over the samples ``rows`` of ``paths``, in order.

    Args:
        paths: the image file of every sample.
        rows: the sample indices to load, in increasing order.
        image_size: the crop size in pixels.
        batch_size: crops per batch.
        workers: loader worker processes; 0 decodes in the calling process.
        device: the device of the forward pass; CUDA gets pinned host memory.
    """
    options = {"prefetch_factor": PREFETCH_BATCHES} if workers > 0 else {}
    return DataLoader(Subset(CroppedImages(paths, image_size), rows), batch_size=batch_size, shuffle=False,
                      num_workers=workers, pin_memory=device.type == "cuda", **options)
