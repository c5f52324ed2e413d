"""A torch Dataset over image files with labels."""

from pathlib import Path

import torch
from torch.utils.data import Dataset

from emo.data.images import BadImageError, load_rgb


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


class ImageFilesWithFailures(Dataset):
    """An :class:`ImageFiles` whose items ``(image, label, index, failure)`` report a file that fails to load.

    ``failure`` is "" for a good file. For a bad one it contains the reason, and ``image`` is
    zeros [3, image_size, image_size]. A file that passed the scan can still fail later (changed or
    deleted meanwhile). Returning the reason instead of raising keeps it intact across DataLoader
    worker processes, which re-raise a worker's exception as a generic RuntimeError.
    """

    def __init__(self, images: ImageFiles, *, image_size: int):
        self.images = images
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, str]:
        try:
            image, label, _ = self.images[index]
            return image, label, index, ""
        except BadImageError as error:
            failure = error.reason
        except OSError as error:
            failure = f"cannot read ({error.strerror or error})"
        return torch.zeros(3, self.image_size, self.image_size), self.images.labels[index], index, failure
