"""Branch heads and their stacking.

A branch is a linear classifier on one stage's pooled features, standardized with the training
split's mean and standard deviation (stored as buffers, so a saved head carries them). The
stacked model averages the branch softmax outputs with learned non-negative weights that sum to
one (a softmax over one logit per branch).
"""

import torch
from torch import nn


class BranchHead(nn.Module):
    """Standardize [B, C] features, apply optional dropout and a linear layer to class logits."""

    def __init__(self, channels: int, num_classes: int, *, dropout: float = 0.0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(channels, num_classes)

    def set_standardization(self, features: torch.Tensor) -> None:
        """Set the mean and standard deviation from training features [N, C]."""
        self.set_statistics(features.mean(dim=0), features.std(dim=0))

    def set_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Set the standardization from a per-column mean and standard deviation [C]."""
        self.mean.copy_(mean)
        # A constant column (std 0) would divide by zero; it carries no information anyway.
        self.std.copy_(std.clamp_min(1e-6))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout((features - self.mean) / self.std))


class StackedHeads(nn.Module):
    """One :class:`BranchHead` per stage and a learned weighted average of their probabilities.

    Example:
        >>> model = StackedHeads({"L3": 1024, "L4": 2048}, num_classes=6)
        >>> probs = model.probabilities({"L3": torch.zeros(2, 1024), "L4": torch.zeros(2, 2048)})
        >>> probs.shape
        torch.Size([2, 6])
    """

    def __init__(self, channels: dict[str, int], num_classes: int, *, dropout: float = 0.0):
        super().__init__()
        self.branches = nn.ModuleDict({name: BranchHead(width, num_classes, dropout=dropout)
                                       for name, width in channels.items()})
        # Zero logits start the stacking as a plain mean of the branches.
        self.stack_logits = nn.Parameter(torch.zeros(len(channels)))

    @property
    def stages(self) -> list[str]:
        """The stage names of the branches, in order."""
        return list(self.branches)

    def stack_weights(self) -> torch.Tensor:
        """Return the branch weights [S]: non-negative, summing to one."""
        return torch.softmax(self.stack_logits, dim=0)

    def branch_logits(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return each branch's logits [B, K]."""
        return {name: head(features[name]) for name, head in self.branches.items()}

    def stack(self, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        """Combine branch logits into stacked probabilities [B, K]."""
        probabilities = torch.stack([torch.softmax(logits[name], dim=1) for name in self.branches])  # [S, B, K]
        return torch.einsum("s,sbk->bk", self.stack_weights(), probabilities)

    def probabilities(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Return the stacked class probabilities [B, K]."""
        return self.stack(self.branch_logits(features))
