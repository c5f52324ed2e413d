"""Training-order samplers: weighted draws against class imbalance, or a plain shuffle."""

import numpy as np
import torch
from torch.utils.data import Sampler, WeightedRandomSampler

SAMPLINGS = ("weighted", "shuffle")


def inverse_frequency_weights(labels: np.ndarray) -> torch.Tensor:
    """Return one weight per sample, inversely proportional to the size of its class."""
    counts = np.bincount(labels)
    return torch.as_tensor(1.0 / counts[labels], dtype=torch.double)


class ShuffleSampler(Sampler[int]):
    """A random permutation of all samples each epoch, drawn from the given generator."""

    def __init__(self, size: int, generator: torch.Generator):
        self.size = size
        self.generator = generator

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        return iter(torch.randperm(self.size, generator=self.generator).tolist())


def make_sampler(labels: np.ndarray, sampling: str, generator: torch.Generator) -> Sampler[int]:
    """Return the sampler for one epoch of training over samples with ``labels``.

    ``weighted`` draws ``len(labels)`` samples with replacement, each with probability inversely
    proportional to its class size, so every class is drawn equally often on average.
    ``shuffle`` visits every sample once in random order.

    Example:
        >>> sampler = make_sampler(np.array([0, 0, 0, 1]), "weighted", torch.Generator().manual_seed(0))
        >>> len(list(sampler))
        4
    """
    if sampling == "weighted":
        return WeightedRandomSampler(inverse_frequency_weights(labels), num_samples=len(labels),
                                     replacement=True, generator=generator)
    if sampling == "shuffle":
        return ShuffleSampler(len(labels), generator)
    raise ValueError(f"sampling {sampling!r} is not one of {', '.join(SAMPLINGS)}")
