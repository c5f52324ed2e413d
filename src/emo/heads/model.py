"""Branch heads and their stacking.

A branch is a linear classifier on one stage's pooled features, standardized with the training
split's mean and standard deviation (stored as buffers, so a saved head carries them). With
``fusion="concat"`` there is a single branch on the concatenated features of all stages. The
stacked model combines the branch softmax outputs in one of three ways:

- ``weighted``: a learned weighted average, with non-negative weights that sum to one (a
  softmax over one logit per branch);
- ``mean``: the plain mean (the weights stay equal);
- ``logreg``: a multinomial logistic regression on the concatenated branch probabilities, whose
  coefficients are fit outside this module (see :mod:`emo.heads.stacking`) and stored in ``meta``.
"""

import torch
from torch import nn

CONCAT_BRANCH = "concat"


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

    def standardize(self, features: torch.Tensor) -> torch.Tensor:
        """Return features [B, C] with the training mean subtracted and divided by the standard deviation."""
        return (features - self.mean) / self.std

    def classify(self, standardized: torch.Tensor) -> torch.Tensor:
        """Return class logits [B, K] of features [B, C] that are already standardized."""
        return self.linear(self.dropout(standardized))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classify(self.standardize(features))


class StackedHeads(nn.Module):
    """Branch heads on stage features and the stacking of their probabilities.

    Args:
        channels: feature width of each input stage, in stage order.
        num_classes: number of classes K.
        dropout: dropout probability before each linear head.
        fusion: ``branches`` (one head per stage) or ``concat`` (one head on all stages).
        stacking: ``weighted``, ``mean`` or ``logreg``; used when there are several branches.

    Example:
        >>> model = StackedHeads({"L3": 1024, "L4": 2048}, num_classes=6)
        >>> probs = model.probabilities({"L3": torch.zeros(2, 1024), "L4": torch.zeros(2, 2048)})
        >>> probs.shape
        torch.Size([2, 6])
    """

    def __init__(self, channels: dict[str, int], num_classes: int, *, dropout: float = 0.0,
                 fusion: str = "branches", stacking: str = "weighted"):
        super().__init__()
        self.channels = dict(channels)
        self.fusion = fusion
        self.stacking = stacking
        widths = {CONCAT_BRANCH: sum(channels.values())} if fusion == "concat" else channels
        self.branches = nn.ModuleDict({name: BranchHead(width, num_classes, dropout=dropout)
                                       for name, width in widths.items()})
        # Zero logits start the stacking as a plain mean of the branches.
        self.stack_logits = nn.Parameter(torch.zeros(len(self.branches)))
        if stacking == "logreg" and len(self.branches) > 1:
            # Maps the concatenated branch probabilities [B, S*K] to class logits [B, K].
            self.meta = nn.Linear(len(self.branches) * num_classes, num_classes)

    @property
    def stages(self) -> list[str]:
        """The branch names in order: the stage names, or ``["concat"]`` for a concatenation head."""
        return list(self.branches)

    def stack_weights(self) -> torch.Tensor:
        """Return the branch weights [S]: non-negative, summing to one."""
        return torch.softmax(self.stack_logits, dim=0)

    def branch_inputs(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return the input [B, C] of each branch from stage features {stage: [B, C_stage]}."""
        if self.fusion == "concat":
            return {CONCAT_BRANCH: torch.cat([features[name] for name in self.channels], dim=1)}
        return {name: features[name] for name in self.branches}

    def branch_logits(self, features: dict[str, torch.Tensor], *, standardized: bool = False) -> dict[str, torch.Tensor]:
        """Return each branch's logits [B, K].

        With ``standardized=True`` the features have already been through :meth:`standardization`,
        as the training rows are once before training, which spares two operators per branch and batch.
        """
        inputs = self.branch_inputs(features)
        if standardized:
            return {name: head.classify(inputs[name]) for name, head in self.branches.items()}
        return {name: head(inputs[name]) for name, head in self.branches.items()}

    def standardization(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the mean and standard deviation [sum of C] of the stages side by side, in stage order."""
        heads = list(self.branches.values())
        return torch.cat([head.mean for head in heads]), torch.cat([head.std for head in heads])

    def stack(self, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        """Combine branch logits into stacked probabilities [B, K]."""
        probabilities = torch.stack([torch.softmax(logits[name], dim=1) for name in self.branches])  # [S, B, K]
        if hasattr(self, "meta"):
            concatenated = probabilities.permute(1, 0, 2).flatten(1)  # [B, S*K], branch-major
            return torch.softmax(self.meta(concatenated), dim=1)
        return torch.einsum("s,sbk->bk", self.stack_weights(), probabilities)

    def probabilities(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Return the stacked class probabilities [B, K]."""
        return self.stack(self.branch_logits(features))
