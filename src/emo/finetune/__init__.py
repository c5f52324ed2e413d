"""End-to-end fine-tuning of the six ResNet variants (fc, l4, full, l4-dropout, skip, ensemble)."""

from emo.finetune.config import VARIANTS, FinetuneConfig
from emo.finetune.train import finetune

__all__ = ["VARIANTS", "FinetuneConfig", "finetune"]
