"""Stage one: run a frozen ResNet over a dataset once and cache its pooled stage outputs."""

from emo.extract.config import ExtractConfig
from emo.extract.run import extract

__all__ = ["ExtractConfig", "extract"]
