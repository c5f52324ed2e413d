"""The classifier ``emo predict`` uses for a fine-tuned run."""

import torch
from torch import nn

from emo.finetune.models import FinetuneNet
from emo.finetune.outputs import load_finetune_model, probabilities, require_finetune_settings


class FinetuneClassifier(nn.Module):
    """A fine-tuned model that maps normalized images [B, 3, H, W] to probabilities [B, K] of its primary output."""

    def __init__(self, model: FinetuneNet):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return probabilities(self.model, images)


def build_finetune_classifier(settings: dict, *, weights: str | None = None) -> nn.Module:
    """Rebuild the trained model of a fine-tuned run for prediction.

    Args:
        settings: the run's config.json with ``classes`` and ``run_dir`` added.
        weights: a state dict file to use instead of the run's ``model.pt`` (for example one saved
            from ``nn.DataParallel``, or the run's ``checkpoint.pt``).

    Returns:
        A :class:`FinetuneClassifier` in eval mode on the CPU.

    Example:
        >>> build_finetune_classifier(read_run_config(Path("runs/l4")) | {"run_dir": "runs/l4"})  # doctest: +SKIP
    """
    require_finetune_settings(settings, settings["run_dir"])
    return FinetuneClassifier(load_finetune_model(settings, weights=weights)).eval()
