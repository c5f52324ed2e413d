"""A torch Dataset over image files with labels."""

from pathlib import Path

import torch
from torch.utils.data import Dataset

from emo.data.images import load_rgb


class ImageFiles(Dataset):
    """Images loaded with :func:`load_rgb`; items are ``(image_tensor, label, index)``."""

    def __init__(self, paths: list[Path], labels: list[int], transform, *, draft_size: int | None = None):
        self.paths = list(paths)
        self.labels = list(labels)
        self.transform = transform
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image = load_rgb(self.paths[index], draft_size=self.draft_size)
        return self.transform(image), self.labels[index], index
