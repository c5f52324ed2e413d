"""Stage two: branch heads on cached stage features and their learned weighted stacking."""

from emo.heads.config import FitHeadsConfig
from emo.heads.model import BranchHead, StackedHeads
from emo.heads.train import fit_heads

__all__ = ["BranchHead", "FitHeadsConfig", "StackedHeads", "fit_heads"]
